"""The supercluster's lease placement: the publishing lease survives the death of any one data region.

Regression of the round-1 failure: nats-py's ``create_key_value`` drops ``placement``, so the lease bucket
landed in the cluster of whoever created it (region a) and died with it."""
from __future__ import annotations

import asyncio

import nats
import pytest

from feed.ha import LEASE_BUCKET, bind_bucket, books_bucket
from feed.natsserver import LEASE_CLUSTER, Supercluster

pytestmark = pytest.mark.e2e


def test_config_shape_clusters_routes_gateways_and_jetstream(tmp_path):
    sc = Supercluster(["a", "b"], servers_per_region=3, lease_servers=3, workdir=str(tmp_path))
    assert [c.name for c in sc.clusters] == ["a", "b", LEASE_CLUSTER] and sc.lease_region == LEASE_CLUSTER
    assert len(sc.servers) == 9 and [r.name for r in sc.regions] == ["a", "b"]
    text = sc.region("a").servers[1].config_text()
    assert 'server_name: "a-1"' in text and 'name: "a"' in text and "jetstream {" in text
    assert text.count("nats://127.0.0.1:") == 3 + 9  # 3 routes, 3 gateway URLs per cluster
    assert Supercluster(["a", "b"], lease_servers=0, workdir=str(tmp_path)).lease_region == "b"
    with pytest.raises(ValueError):
        Supercluster(["a", LEASE_CLUSTER])


async def test_lease_and_books_buckets_live_where_placed_and_survive_region_a(tmp_path):
    sc = Supercluster(["a", "b"], workdir=str(tmp_path)).start()
    nca = ncb = None
    try:
        a, b = sc.regions
        nca = await nats.connect(a.url)
        ncb = await nats.connect(b.url, max_reconnect_attempts=-1)
        kv = await bind_bucket(nca.jetstream(), LEASE_BUCKET, sc.lease_region)  # created from region a
        await bind_bucket(nca.jetstream(), books_bucket("b"), "b")
        for stream, cluster in ((f"KV_{LEASE_BUCKET}", LEASE_CLUSTER), (f"KV_{books_bucket('b')}", "b")):
            info = await ncb.jetstream().stream_info(stream)
            assert info.cluster.name == cluster, (stream, info.cluster)
        first = await kv.create("ingest", b"a")
        a.kill()  # SIGKILL region a's only server
        kv_b = await ncb.jetstream().key_value(LEASE_BUCKET)
        assert await asyncio.wait_for(kv_b.update("ingest", b"b", last=first), 10) > first
        assert (await kv_b.get("ingest")).value == b"b"
        books = await ncb.jetstream().key_value(books_bucket("b"))
        await asyncio.wait_for(books.put("snap.x", b"{}"), 10)
        with pytest.raises(RuntimeError, match="lives in cluster"):  # a bucket found elsewhere is named
            await bind_bucket(ncb.jetstream(), books_bucket("b"), LEASE_CLUSTER)
    finally:
        for nc in (nca, ncb):
            if nc is not None and not nc.is_closed:
                await nc.close()
        sc.cleanup()


async def test_regions_in_network_namespaces_partition_with_nftables_and_always_clean_up(tmp_path):
    """As root: each cluster in its own network namespace (veth to a bridge, private address); a partition is
    an nftables table inside region a's namespace dropping the other clusters' addresses: a's messages stop
    reaching b while a's own clients still reach a; healed, they flow again; stopped, nothing is left. A
    namespace left by a killed run (its creator's PID gone) is removed by the next run."""
    from feed import partition

    try:
        partition.check()
    except partition.PartitionUnavailable as exc:
        pytest.skip(f"skipped the network namespaces and the nftables partition between them: {exc}")
    import subprocess

    # what a SIGKILLed run leaves: a namespace of ours whose creating process is gone, and its bridge
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns, stale_br = f"{partition.NETNS_PREFIX}abc123-{dead.pid}-a", f"{partition.BRIDGE_PREFIX}abc123"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_br, "type", "bridge"], check=True)
    sc = Supercluster(["a", "b"], workdir=str(tmp_path), netns=True)
    net = sc.network
    nca = ncb = None
    try:
        sc.start()
        assert stale_ns not in partition._namespaces() and stale_br not in partition._bridges()
        a, b = sc.regions
        assert a.servers[0].host == net.addresses["a"] != net.addresses["b"] and a.servers[0].host.startswith("10.")
        nca = await nats.connect(a.url)
        ncb = await nats.connect(b.url)
        got: list[bytes] = []

        async def on_msg(msg) -> None:
            got.append(msg.data)

        await ncb.subscribe("part.x", cb=on_msg)
        await ncb.flush()

        async def crosses(payload: bytes, within_s: float) -> bool:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within_s
            while loop.time() < deadline:
                await nca.publish("part.x", payload)
                await nca.flush(timeout=5)  # a's own client still reaches a
                if payload in got:
                    return True
                await asyncio.sleep(0.1)
            return False

        assert await crosses(b"before", 20)  # the gateway link carries interest and messages
        with partition.Partition(sc, "a") as cut:
            assert cut.exists()
            got.clear()
            assert not await crosses(b"during", 2.0)
            assert cut.dropped() > 0
        assert not cut.exists()
        assert await crosses(b"after", 60)
    finally:
        for nc in (nca, ncb):
            if nc is not None and not nc.is_closed:
                await nc.close()
        sc.cleanup()
        for ns in (stale_ns,):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", stale_br], capture_output=True)
    assert not net.exists()


async def test_lease_bucket_is_r3_in_a_lease_cluster_of_three_and_survives_one_server(tmp_path):
    """The documented production shape's witness: a lease cluster of 3 servers holds the lease bucket with 3
    replicas (what ``RegionsStack`` asks for: min(3, servers)); with one of its servers SIGKILLed the lease
    is still written (a quorum of 2)."""
    from feed.ha import config_from_args, add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--region", "a", "--regions", "a,b", "--lease-replicas", "3"]))
    assert cfg.lease_replicas == 3 and cfg.books_replicas == 1
    sc = Supercluster(["a", "b"], workdir=str(tmp_path), lease_servers=3).start()
    nc = None
    try:
        nc = await nats.connect(sc.regions[0].url)
        kv = await bind_bucket(nc.jetstream(), LEASE_BUCKET, sc.lease_region, replicas=cfg.lease_replicas)
        info = await nc.jetstream().stream_info(f"KV_{LEASE_BUCKET}")
        assert info.config.num_replicas == 3 and info.cluster.name == LEASE_CLUSTER
        rev = await kv.create("ingest", b"a")
        # JetStream's meta data can take a moment to name the stream's peers on a loaded host
        deadline = asyncio.get_running_loop().time() + 30
        while len(info.cluster.replicas or []) < 2:
            assert asyncio.get_running_loop().time() < deadline, info.cluster
            await asyncio.sleep(0.2)
            info = await nc.jetstream().stream_info(f"KV_{LEASE_BUCKET}")
        victim = next(s for s in sc.lease.servers if s.name == info.cluster.leader)
        victim.proc.kill()
        victim.proc.wait(10)
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # a new stream leader is elected among the two left, then the write lands
            try:
                rev = await asyncio.wait_for(kv.update("ingest", b"b", last=rev), 5)
                break
            except Exception:  # noqa: BLE001 - no leader yet
                assert asyncio.get_running_loop().time() < deadline, "the R3 lease bucket lost its quorum"
                await asyncio.sleep(0.2)
        assert (await kv.get("ingest")).value == b"b"
    finally:
        if nc is not None and not nc.is_closed:
            await nc.close()
        sc.cleanup()


def test_ingest_started_before_jetstream_has_a_quorum_waits_for_it(tmp_path):
    """A regression of a fresh-clone CI failure: a region drill's ingest exited with code 1 at start on a
    starved host. Its ``--connect-timeout-s`` (10 s) bounded the HA start too, and a lease bucket that JetStream
    could not create yet was fatal at once. Here region a's server runs alone (no JetStream meta quorum: 1 of 3
    servers), so the lease bucket cannot be bound; the ingest, with a 2 s connect timeout, must keep trying,
    say so in its log, and come up once the other servers start."""
    from feed.procs import free_port, http_ok, port_open, stop_process, wait_until
    from feed.regions import spawn_cli
    from feed.stack import bundled_capture

    sc = Supercluster(["a", "b"], workdir=str(tmp_path))
    a0 = sc.region("a").servers[0]
    ingest = None
    log_path = tmp_path / "ingest-a.log"
    try:
        a0.start_nowait()
        wait_until(lambda: port_open(a0.host, a0.port), 30, what="nats-server a-0 client port", proc=a0.proc)
        port = free_port()
        ingest = spawn_cli(["replay", "--nats", a0.url, "--http-port", str(port), "--connect-timeout-s", "2",
                            "--name", "ingest-a", "--region", "a", "--regions", "a,b", "--lease-region",
                            sc.lease_region, "--lease-ttl-s", "1", "--loop", str(bundled_capture())], log_path)
        wait_until(lambda: log_path.exists() and "not bound yet" in log_path.read_text(), 60,
                   what="ingest logs that the lease bucket is not bound yet", proc=ingest)
        wait_until(lambda: "connected to NATS" in log_path.read_text(), 5, what="ingest logs its connection")
        for s in sc.servers:
            s.start_nowait()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 90, what="ingest /healthz", proc=ingest)
        text = log_path.read_text()
        assert "KV bucket md_lease in lease bound after" in text, text[-3000:]
        assert ingest.poll() is None
    finally:
        if ingest is not None:
            stop_process(ingest)
        sc.cleanup()


def test_ingest_exits_1_naming_jetstream_when_the_lease_bucket_never_binds(tmp_path):
    """The same lone server, JetStream never reaching a quorum: after ``--jetstream-wait-s`` the ingest exits
    with code 1 and says what it could not do (not "cannot connect to NATS": it did connect)."""
    from feed.procs import free_port, port_open, stop_process, wait_until
    from feed.regions import spawn_cli
    from feed.stack import bundled_capture

    sc = Supercluster(["a", "b"], workdir=str(tmp_path))
    a0 = sc.region("a").servers[0]
    ingest = None
    log_path = tmp_path / "ingest-a.log"
    try:
        a0.start_nowait()
        wait_until(lambda: port_open(a0.host, a0.port), 30, what="nats-server a-0 client port", proc=a0.proc)
        ingest = spawn_cli(["replay", "--nats", a0.url, "--http-port", str(free_port()), "--jetstream-wait-s", "1",
                            "--name", "ingest-a", "--region", "a", "--regions", "a,b", "--lease-region",
                            sc.lease_region, str(bundled_capture())], log_path)
        assert ingest.wait(60) == 1
        text = log_path.read_text()
        assert "cannot join the publishing lease" in text and "is JetStream up" in text, text[-2000:]
        assert "cannot connect to NATS" not in text
        import re

        for line in (x for x in text.splitlines() if "cannot join the publishing lease" in x or "not bound yet" in x):
            names = re.findall(r"\b\w+Error\b", line)
            assert len(names) == len(set(names)), f"an error class named twice: {line}"
    finally:
        if ingest is not None:
            stop_process(ingest)
        sc.cleanup()
