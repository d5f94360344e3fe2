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
