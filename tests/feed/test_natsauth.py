"""NATS auth and permissions (feed.natsauth) against a real nats-server that enforces them.

The gateway's user may read market data and request snapshots, never publish a delta: a forged delta
is refused by nats-server before any subscriber sees it. The ingest authenticates with its own user.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
from pathlib import Path

import nats
import pytest
from prometheus_client import CollectorRegistry
from nats.errors import NoRespondersError

from feed import natsauth, wire
from feed.ingest import Ingest, IngestConfig
from feed.natsauth import (
    NatsAuthError,
    NatsCredentials,
    NatsNkeyUser,
    NatsRole,
    NatsUser,
    authorization_block,
    redacted_url,
    write_nkey_seed_file,
    write_password_file,
)
from feed.natsserver import NatsServer
from feed.subjects import ANNOUNCE_REQUEST, delta_subject, directory_subject, snapshot_subject, trade_subject
from tests.conftest import SHARED_DATA

INSTRUMENT = "coinbase:BTC-USD"


@pytest.fixture(scope="module")
def users() -> dict[NatsRole, NatsUser]:
    return {role: NatsUser.generate(role) for role in NatsRole}


@pytest.fixture(scope="module")
def nkey_users() -> dict[NatsRole, NatsNkeyUser]:
    return {role: NatsNkeyUser.generate(role, name=f"{role.value}-nk") for role in (NatsRole.INGEST, NatsRole.GATEWAY)}


@pytest.fixture(scope="module")
def server(users, nkey_users, tmp_path_factory):
    ns = NatsServer(name="auth-nats", users=[*users.values(), *nkey_users.values()],
                    workdir=str(tmp_path_factory.mktemp("nats")))
    ns.start()
    try:
        yield ns
    finally:
        ns.cleanup()


class Client:
    """A NATS connection as one role, collecting the async errors nats-server sends it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, url: str, user: NatsUser | None) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        creds = NatsCredentials(user.name, user.password) if user else NatsCredentials()
        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=5,
                                     **creds.connect_kwargs())
        return self

    async def wait_error(self, needle: str, timeout_s: float = 5.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for e in self.errors:
                if needle.lower() in e.lower():
                    return e
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no error containing {needle!r}; got {self.errors}")
            await asyncio.sleep(0.02)


def test_config_block_has_no_anonymous_user_and_role_permissions(users):
    text = authorization_block(list(users.values()))
    assert "no_auth_user" not in text
    gateway_line = next(ln for ln in text.splitlines() if '"gateway"' in ln)
    assert 'publish: {allow: ["md.v1.snap.*.*", "md.v1.ctl.announce"]}' in gateway_line
    ingest_line = next(ln for ln in text.splitlines() if '"ingest"' in ln)
    assert "allow_responses: true" in ingest_line
    admin_line = next(ln for ln in text.splitlines() if '"admin"' in ln)
    assert "permissions" not in admin_line


@pytest.mark.parametrize("name,password,match", [
    ("", "x" * 20, "non-empty"), ("a b", "x" * 20, "without spaces"), ("u", "short", "at least 12"),
    ("u", "x" * 20 + "\n", "one line"),
])
def test_bad_users_refused(name, password, match):
    with pytest.raises(NatsAuthError, match=match):
        NatsUser(name, password, NatsRole.GATEWAY)


def test_credentials_from_files(tmp_path):
    user = NatsUser("gw", 'p"a\\ss word-1234', NatsRole.GATEWAY)
    path = write_password_file(tmp_path, user)
    assert path.stat().st_mode & 0o777 == 0o600
    creds = NatsCredentials.from_files("gw", path)
    assert creds.connect_kwargs() == {"user": "gw", "password": user.password}
    assert user.password not in repr(creds) and user.password not in repr(user)
    assert NatsCredentials.from_files(None, None).connect_kwargs() == {}
    with pytest.raises(NatsAuthError, match="both"):
        NatsCredentials.from_files("gw", None)
    with pytest.raises(NatsAuthError, match="cannot read"):
        NatsCredentials.from_files("gw", tmp_path / "missing")


def test_redacted_url():
    assert redacted_url("nats://ingest:hunter2hunter2@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redacted_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


async def test_anonymous_and_wrong_password_refused(server, users):
    with pytest.raises(Exception, match="(?i)authorization"):
        await Client().connect(server.url, None)
    wrong = NatsUser("gateway", "not-the-password-at-all", NatsRole.GATEWAY)
    with pytest.raises(Exception, match="(?i)authorization"):
        await Client().connect(server.url, wrong)
    # with unlimited reconnects nats-py would retry for ever: natsauth.connect fails fast, names the user
    with pytest.raises(NatsAuthError, match="user 'gateway'") as info:
        await asyncio.wait_for(natsauth.connect(server.url, NatsCredentials("gateway", wrong.password),
                                                max_reconnect_attempts=-1, reconnect_time_wait=0.05), 10)
    assert wrong.password not in str(info.value)


async def test_gateway_cannot_publish_deltas_or_trades_and_the_forgery_never_arrives(server, users):
    ingest = await Client().connect(server.url, users[NatsRole.INGEST])
    gateway = await Client().connect(server.url, users[NatsRole.GATEWAY])
    watcher = await Client().connect(server.url, users[NatsRole.GATEWAY])
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def on_msg(msg) -> None:
        received.append(msg.data)
        arrived.set()

    try:
        await watcher.nc.subscribe(delta_subject(INSTRUMENT), cb=on_msg)
        await watcher.nc.subscribe(trade_subject(INSTRUMENT), cb=on_msg)
        await watcher.nc.flush()
        forged = b'{"type":"delta","instrument":"coinbase:BTC-USD","epoch":"e","seq":7,"prev_seq":6,"changes":[]}'
        await gateway.nc.publish(delta_subject(INSTRUMENT), forged)
        await gateway.nc.publish(trade_subject(INSTRUMENT), b'{"type":"trade"}')
        await gateway.nc.publish(directory_subject("coinbase"), b'{"instruments":[]}')
        await gateway.nc.flush()
        err = await gateway.wait_error("permissions violation for publish")
        assert "md.v1.coinbase.btc-usd" in err.lower()
        await gateway.wait_error('publish to "md.v1.trade.coinbase.BTC-USD"')
        await gateway.wait_error('publish to "md.v1.meta.instruments.coinbase"')
        real = b'{"type":"delta","seq":7}'
        await ingest.nc.publish(delta_subject(INSTRUMENT), real)  # published after the forgeries
        await ingest.nc.flush()
        await asyncio.wait_for(arrived.wait(), 5)
        assert received == [real]  # the forgeries never reached a subscriber; the real one did
        assert not ingest.errors
    finally:
        for c in (ingest, gateway, watcher):
            await c.nc.close()


async def test_gateway_reads_market_data_and_requests_snapshots(server, users):
    ingest = await Client().connect(server.url, users[NatsRole.INGEST])
    gateway = await Client().connect(server.url, users[NatsRole.GATEWAY])
    try:
        async def answer(msg) -> None:
            await msg.respond(b'{"type":"snapshot"}')

        announces: list[bytes] = []

        async def on_announce(msg) -> None:
            announces.append(msg.subject.encode())

        await ingest.nc.subscribe("md.v1.snap.*.*", cb=answer)
        await ingest.nc.subscribe(ANNOUNCE_REQUEST, cb=on_announce)
        await ingest.nc.flush()
        reply = await gateway.nc.request(snapshot_subject(INSTRUMENT), b"", timeout=5)
        assert reply.data == b'{"type":"snapshot"}'
        await gateway.nc.publish(ANNOUNCE_REQUEST, b"")
        await gateway.nc.flush()
        for _ in range(100):
            if announces:
                break
            await asyncio.sleep(0.02)
        assert announces == [ANNOUNCE_REQUEST.encode()]
        assert not gateway.errors and not ingest.errors
    finally:
        await ingest.nc.close()
        await gateway.nc.close()


async def test_gateway_cannot_answer_or_snoop_snapshot_requests(server, users):
    gateway = await Client().connect(server.url, users[NatsRole.GATEWAY])
    other = await Client().connect(server.url, users[NatsRole.GATEWAY])
    try:
        async def forge_reply(msg) -> None:
            await msg.respond(b"forged")

        await gateway.nc.subscribe("md.v1.snap.*.*", cb=forge_reply)
        await gateway.nc.flush()
        await gateway.wait_error("permissions violation for subscription")
        with pytest.raises((NoRespondersError, asyncio.TimeoutError, nats.errors.TimeoutError)):
            await other.nc.request(snapshot_subject("coinbase:NOBODY"), b"", timeout=1)
    finally:
        await gateway.nc.close()
        await other.nc.close()


async def test_ingest_with_credentials_publishes_and_answers_a_gateway_user(server, users, tmp_path):
    """A real ``Ingest`` replaying a real recording logs in with its password file; a gateway user gets
    its deltas and its snapshot, and an anonymous ingest is refused."""
    capture = tmp_path / "head.jsonl"
    with open(SHARED_DATA / "coinbase" / "coinbase-level2-20210417.jsonl") as src:
        capture.write_text("".join(itertools.islice(src, 300)))
    password_file = write_password_file(tmp_path, users[NatsRole.INGEST])
    creds = NatsCredentials.from_files("ingest", password_file)
    gateway = await Client().connect(server.url, users[NatsRole.GATEWAY])
    deltas: list[dict] = []

    async def on_delta(msg) -> None:
        data = wire.loads(msg.data)
        if data.get("type") == "delta":  # instrument_status shares the subject (PROTOCOL section 11)
            deltas.append(data)

    await gateway.nc.subscribe("md.v1.coinbase.*", cb=on_delta)
    await gateway.nc.flush()
    ingest = Ingest(IngestConfig(nats_url=server.url, captures=[capture], speed=None, nats_credentials=creds),
                    registry=CollectorRegistry())
    try:
        await ingest.start()
        await ingest.run()
        await ingest.nc.flush()
        for _ in range(250):
            if deltas and ingest.published == len(deltas):
                break
            await asyncio.sleep(0.02)
        assert ingest.published > 0 and len(deltas) == ingest.published
        inst = deltas[-1]["instrument"]
        reply = await gateway.nc.request(snapshot_subject(inst), b"", timeout=5)
        snap = wire.loads(reply.data)
        assert snap["type"] == "snapshot" and snap["instrument"] == inst
        assert not gateway.errors
    finally:
        await ingest.stop()
        await gateway.nc.close()
    anonymous = Ingest(IngestConfig(nats_url=server.url, captures=[capture], speed=None), registry=CollectorRegistry())
    with pytest.raises(NatsAuthError, match="anonymous client"):
        await asyncio.wait_for(anonymous.start(), 10)
    if anonymous.nc is not None:
        await anonymous.nc.close()


def test_replay_cli_refuses_half_credentials(tmp_path, capsys):
    from feed.cli import main

    capture = Path(SHARED_DATA / "coinbase" / "coinbase-level2-20210417.jsonl")
    assert main(["replay", "--nats-user", "ingest", str(capture)]) == 2
    assert "--nats-password-file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# nkey logins: the same roles and permissions, the server holding only public keys


def test_nkey_users_in_the_config_block_show_only_public_keys(nkey_users):
    text = authorization_block(list(nkey_users.values()))
    gw = nkey_users[NatsRole.GATEWAY]
    line = next(ln for ln in text.splitlines() if gw.public_key in ln)
    assert line.lstrip().startswith('{nkey: "U') and "password" not in line
    assert 'publish: {allow: ["md.v1.snap.*.*", "md.v1.ctl.announce"]}' in line
    for user in nkey_users.values():
        assert user.seed.decode() not in text and user.seed.decode() not in repr(user)


def test_nkey_credentials_from_files(tmp_path, nkey_users):
    import nkeys

    gw = nkey_users[NatsRole.GATEWAY]
    path = write_nkey_seed_file(tmp_path, gw)
    assert path.stat().st_mode & 0o777 == 0o600
    creds = NatsCredentials.from_files(None, None, path)
    assert creds.connect_kwargs() == {"nkeys_seed": str(path)}
    assert creds.nkey == gw.public_key and creds.describe() == f"nkey {gw.public_key}"
    assert gw.seed.decode() not in repr(creds)
    with pytest.raises(NatsAuthError, match="not both"):
        NatsCredentials.from_files("gw", tmp_path / "pw", path)
    with pytest.raises(NatsAuthError, match="cannot read"):
        NatsCredentials.from_files(None, None, tmp_path / "missing.nk")
    (tmp_path / "garbage.nk").write_text("SUNOTASEED\n")
    with pytest.raises(NatsAuthError, match="no valid nkey seed") as info:
        NatsCredentials.from_files(None, None, tmp_path / "garbage.nk")
    assert "SUNOTASEED" not in str(info.value)
    account = nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_ACCOUNT)
    (tmp_path / "account.nk").write_bytes(account)
    with pytest.raises(NatsAuthError, match="not a user"):
        NatsCredentials.from_files(None, None, tmp_path / "account.nk")


def test_gateway_options_carry_the_nkey_seed_file_to_each_worker(tmp_path, nkey_users):
    from feed.gateway import hardening, server as gw_server

    path = write_nkey_seed_file(tmp_path, nkey_users[NatsRole.GATEWAY])
    parser = argparse.ArgumentParser()
    gw_server.add_arguments(parser)
    args = parser.parse_args(["--nats-nkey-seed-file", str(path)])
    argv = hardening.worker_argv(args)
    assert argv[argv.index("--nats-nkey-seed-file") + 1] == str(path)
    assert gw_server.config_from_args(args).nats_credentials.connect_kwargs() == {"nkeys_seed": str(path)}


async def test_nkey_gateway_reads_and_requests_but_may_not_publish_a_delta(server, nkey_users, tmp_path):
    """Logged in with nkeys from seed files: the gateway user gets deltas and snapshot replies from the
    ingest user; its own delta is refused by nats-server and never reaches a subscriber; an nkey the
    server does not list is refused and named by its public key."""
    creds = {role: NatsCredentials.from_files(None, None, write_nkey_seed_file(tmp_path, user))
             for role, user in nkey_users.items()}
    errors: dict[str, list[str]] = {"ingest": [], "gateway": []}

    def collect(who: str):
        async def on_error(exc: Exception) -> None:
            errors[who].append(str(exc))
        return on_error

    ingest = await natsauth.connect(server.url, creds[NatsRole.INGEST], error_cb=collect("ingest"),
                                    allow_reconnect=False)
    gateway = await natsauth.connect(server.url, creds[NatsRole.GATEWAY], error_cb=collect("gateway"),
                                     allow_reconnect=False)
    try:
        received: list[bytes] = []
        arrived = asyncio.Event()

        async def on_delta(msg) -> None:
            received.append(msg.data)
            arrived.set()

        async def answer(msg) -> None:
            await msg.respond(b'{"type":"snapshot"}')

        await gateway.subscribe(delta_subject(INSTRUMENT), cb=on_delta)
        await ingest.subscribe("md.v1.snap.*.*", cb=answer)
        await gateway.flush()
        await ingest.flush()
        reply = await gateway.request(snapshot_subject(INSTRUMENT), b"", timeout=5)
        assert reply.data == b'{"type":"snapshot"}'
        await gateway.publish(delta_subject(INSTRUMENT), b'{"type":"delta","seq":7,"forged":true}')
        await gateway.flush()
        for _ in range(250):
            if any("permissions violation for publish" in e.lower() for e in errors["gateway"]):
                break
            await asyncio.sleep(0.02)
        assert any("permissions violation for publish" in e.lower() and "md.v1.coinbase.btc-usd" in e.lower()
                   for e in errors["gateway"]), errors
        real = b'{"type":"delta","seq":7}'
        await ingest.publish(delta_subject(INSTRUMENT), real)  # after the forgery
        await ingest.flush()
        await asyncio.wait_for(arrived.wait(), 5)
        assert received == [real] and not errors["ingest"]
    finally:
        await ingest.close()
        await gateway.close()
    stranger = NatsNkeyUser.generate(NatsRole.GATEWAY, name="stranger")
    strange = NatsCredentials.from_files(None, None, write_nkey_seed_file(tmp_path, stranger))
    with pytest.raises(NatsAuthError, match=f"nkey {stranger.public_key}"):
        await asyncio.wait_for(natsauth.connect(server.url, strange, max_reconnect_attempts=-1,
                                                reconnect_time_wait=0.05), 10)
