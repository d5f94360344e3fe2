"""The gateway's HTTP edge apart from the gateway: auth on upgrade and REST, the ops app, TLS."""
from __future__ import annotations

import datetime
import ssl

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from feed.auth import Algorithm, KeySet, TokenLimits, TokenUsage, TokenVerifier, VerificationKey
from feed.gateway.ops import create_ops_app
from feed.gateway.security import Authenticator
from feed.gateway.tls import TlsConfigError, server_ssl_context
from feed.procs import free_port

SECRET = b"edge-test-secret-edge-test-secret-0001"
NOW_S = 1_765_450_800


def token(**claims) -> str:
    base = {"sub": "desk", "exp": NOW_S + 3600, "instruments": ["polymarket:*"]}
    base.update(claims)
    return jwt.encode(base, SECRET, algorithm="HS256", headers={"kid": "k"})


class Edge:
    def __init__(self, max_connections_per_token: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.failures = Counter("bookcast_gateway_auth_failures", "x", ["reason"], registry=self.registry)
        self.caps: list[str] = []
        verifier = TokenVerifier(KeySet((VerificationKey("k", Algorithm.HS256, SECRET),)))
        self.auth = Authenticator(verifier, TokenUsage(TokenLimits(max_connections_per_token=max_connections_per_token)),
                                  metric=self.failures, rejected=self.caps.append, clock_ns=lambda: NOW_S * 10**9)
        self.port = free_port()

    async def __aenter__(self) -> Edge:
        app = web.Application()

        async def ws_handler(request: web.Request) -> web.StreamResponse:
            auth = self.auth(request)  # the upgrade hook
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            try:
                await ws.send_str(auth.subject)
                async for _ in ws:
                    pass
            finally:
                self.auth.release(auth)
            return ws

        async def book(request: web.Request) -> web.Response:
            return web.json_response({"type": "snapshot", "instrument": request.match_info["instrument"]})

        async def listing(request: web.Request) -> web.Response:
            return web.json_response({"instruments": [{"instrument": "polymarket:1"}, {"instrument": "coinbase:X"}]})

        app.router.add_get("/v1/ws", ws_handler)
        app.router.add_get("/v1/book/{instrument}", book)
        app.router.add_get("/v1/instruments", listing)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def failed(self, reason: str) -> float:
        return self.registry.get_sample_value("bookcast_gateway_auth_failures_total", {"reason": reason}) or 0


async def test_upgrade_needs_a_valid_token_in_header_or_query():
    async with Edge() as edge, aiohttp.ClientSession() as s:
        for kwargs in ({}, {"headers": {"Authorization": "Bearer nope"}},
                       {"params": {"token": token(exp=NOW_S - 1)}}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(edge.url("/v1/ws"), **kwargs)
            assert info.value.status == 401
        async with s.ws_connect(edge.url("/v1/ws"), headers={"Authorization": f"Bearer {token()}"}) as ws:
            assert (await ws.receive_str(timeout=5)) == "desk"
        async with s.ws_connect(edge.url("/v1/ws"), params={"token": token(sub="viewer")}) as ws:
            assert (await ws.receive_str(timeout=5)) == "viewer"
        assert edge.failed("missing") == 1 and edge.failed("malformed") == 1 and edge.failed("expired") == 1


async def test_connections_per_token_capped_with_429_and_released_on_close():
    headers = {"Authorization": f"Bearer {token()}"}
    async with Edge(max_connections_per_token=2) as edge, aiohttp.ClientSession() as s:
        first = await s.ws_connect(edge.url("/v1/ws"), headers=headers)
        second = await s.ws_connect(edge.url("/v1/ws"), headers=headers)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(edge.url("/v1/ws"), headers=headers)
        assert info.value.status == 429 and edge.caps == ["token_cap"]
        other = await s.ws_connect(edge.url("/v1/ws"), params={"token": token(sub="other")})  # its own count
        await first.close()
        for _ in range(100):
            if sum(edge.auth.usage.connections.values()) == 2:
                break
            await asyncio_sleep(0.02)
        third = await s.ws_connect(edge.url("/v1/ws"), headers=headers)
        for ws in (second, other, third):
            await ws.close()


async def asyncio_sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


async def test_ops_app_routes():
    registry = CollectorRegistry()
    Counter("bookcast_gateway_requests", "x", registry=registry).inc()
    app = create_ops_app(registry, lambda: {"connections": 3}, lambda: False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200 and "bookcast_gateway_requests_total 1.0" in await r.text()
            async with s.get(f"http://127.0.0.1:{port}/v1/status") as r:
                assert (await r.json())["connections"] == 3
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
    finally:
        await runner.cleanup()


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_listener_serves_https(tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    ctx = server_ssl_context(cert_file, key_file)
    app = web.Application()
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert_file))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/healthz", ssl=client_ctx) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):  # an unverified certificate is refused by a careful client
                async with s.get(f"https://127.0.0.1:{port}/healthz"):
                    pass
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    finally:
        await runner.cleanup()


def test_tls_config_errors_name_the_file(tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    with pytest.raises(TlsConfigError, match="not found"):
        server_ssl_context(tmp_path / "missing.pem", key_file)
    with pytest.raises(TlsConfigError, match="cannot load"):
        server_ssl_context(cert_file, cert_file)
