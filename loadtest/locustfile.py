"""Locust users for bookcast: many WebSocket consumers, each keeping SDK-verified books.

Two user classes, pick one or both on the command line:

* ``BookcastUser`` connects to a gateway's ``/v1/ws`` (PROTOCOL.md), subscribes per the instrument mix
  with ``conflate_ms`` and ``channels``, and answers the SDK's resync actions.
* ``NatsWsUser`` is the peer: it speaks the NATS protocol to nats-server's own WebSocket listener
  (``loadtest.natsproto``): ``CONNECT``, ``SUB`` to the delta (and trade) subjects, snapshots by NATS
  request/reply to ``md.v1.snap.*`` as the gateway fetches them, ``PING``/``PONG``.

Both feed every message to ``feed.client.verify.VerifiedBooks`` (checksums, seq chains) and report each
received message as a locust request: type ``WS`` or ``NATS-WS``, name the message type, response time
the receipt minus ``ts_publish_ns`` (ingest publish; end to end) or, for messages without it
(heartbeat, pong), minus ``ts_send_ns``, in ms. Failures: ``gap <reason>`` (the SDK found a broken seq
chain or checksum and asked for a snapshot), ``resync <reason>`` (the gateway sent ``resync``), ``error
<code>``, and ``timeout`` (bookcast sent nothing, not even its 1 s heartbeat, for ``--bc-recv-timeout-s``).

Run headless from the repo root against a running stack (``./dev up``: gateway on :8080):

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s --csv run/locust/bookcast \\
        BookcastUser --bc-url ws://127.0.0.1:8080/v1/ws --bc-per-user 3

Options (each also from its environment variable): ``--bc-url`` (BOOKCAST_LOAD_URL), ``--bc-nats-ws-url``
(BOOKCAST_LOAD_NATS_WS_URL), ``--bc-instruments`` (BOOKCAST_LOAD_INSTRUMENTS; empty: every instrument the
gateway lists, or NATS's directory announces), ``--bc-weights`` (BOOKCAST_LOAD_WEIGHTS), ``--bc-per-user``
(BOOKCAST_LOAD_PER_USER), ``--bc-conflate-ms`` (BOOKCAST_LOAD_CONFLATE_MS), ``--bc-channels``
(BOOKCAST_LOAD_CHANNELS), ``--bc-recv-timeout-s`` (BOOKCAST_LOAD_RECV_TIMEOUT_S).

Imported only by locust (it monkey-patches the process with gevent): never from bookcast or pytest.
"""
from __future__ import annotations

import json
import random
import secrets
import time
import urllib.request

import gevent
import orjson
import websocket
from locust import User, constant, events, task
from locust.exception import StopUser

from feed import wire
from feed.client.verify import GapDetected, ResyncReceived, SendResync, VerifiedBooks
from feed.subjects import ANNOUNCE_REQUEST, DIRECTORY_WILDCARD, delta_subject, snapshot_subject, trade_subject
from loadtest import natsproto
from loadtest.mix import Mix, split_list


@events.init.add_listener
def _fresh_clock(**_kwargs) -> None:
    """gevent's loop caches its clock until it first runs, and headless locust schedules ``--run-time``
    from that cache before the loop has run: after a slow start-up (imports on a loaded machine took
    longer than the run time) the run ended at once, with no request made. Refresh the clock first."""
    gevent.get_hub().loop.update_now()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    add = parser.add_argument
    add("--bc-url", env_var="BOOKCAST_LOAD_URL", default="ws://127.0.0.1:8080/v1/ws",
        help="bookcast gateway WebSocket URL (BookcastUser)")
    add("--bc-nats-ws-url", env_var="BOOKCAST_LOAD_NATS_WS_URL", default="",
        help="nats-server WebSocket listener URL (NatsWsUser; required for it)")
    add("--bc-instruments", env_var="BOOKCAST_LOAD_INSTRUMENTS", default="",
        help="comma-separated instrument ids of the mix (default: every instrument listed/announced)")
    add("--bc-weights", env_var="BOOKCAST_LOAD_WEIGHTS", default="",
        help="comma-separated weights, one per instrument (default: equal)")
    add("--bc-per-user", env_var="BOOKCAST_LOAD_PER_USER", type=int, default=1,
        help="distinct instruments each user draws from the mix")
    add("--bc-conflate-ms", env_var="BOOKCAST_LOAD_CONFLATE_MS", type=int, default=0,
        help="conflate_ms of each subscription, 0..5000 (BookcastUser)")
    add("--bc-channels", env_var="BOOKCAST_LOAD_CHANNELS", default="book", help="comma-separated: book, trades")
    add("--bc-recv-timeout-s", env_var="BOOKCAST_LOAD_RECV_TIMEOUT_S", type=float, default=5.0,
        help="silence that counts as a failure on bookcast (its heartbeat comes every 1 s)")


_directory: dict[str, list[str]] = {}  # url -> instruments discovered there, once per locust process


def _gateway_instruments(ws_url: str) -> list[str]:
    http = ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rsplit("/v1/ws", 1)[0]
    with urllib.request.urlopen(http + "/v1/instruments", timeout=10) as r:
        return [entry["instrument"] for entry in json.loads(r.read())["instruments"]]


class _Receiver(User):
    """What both users share: the mix, the verified books, and reporting messages to locust."""

    abstract = True
    wait_time = constant(0)
    request_type = "WS"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.books = VerifiedBooks()
        self.ws: websocket.WebSocket | None = None
        instruments = split_list(opts.bc_instruments) or self._discover()
        self.instruments = Mix.parse(instruments, opts.bc_weights).draw(opts.bc_per_user, random.Random())
        self.channels = split_list(opts.bc_channels)

    def _discover(self) -> list[str]:
        raise NotImplementedError

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def report(self, msg: dict, size: int, recv_ns: int) -> None:
        """One locust request event for ``msg``, then the SDK's verdict on it."""
        kind = str(msg.get("type"))
        sent_ns = msg.get("ts_publish_ns") or msg.get("ts_send_ns")
        latency_ms = (recv_ns - sent_ns) / 1e6 if isinstance(sent_ns, int) else 0.0
        failure = None
        if kind == "error":
            kind, failure = f"error {msg.get('code')}", RuntimeError(str(msg.get("message")))
        self.environment.events.request.fire(request_type=self.request_type, name=kind, response_time=latency_ms,
                                             response_length=size, exception=failure, context={})
        for out in self.books.on_message(msg, recv_ns):
            if isinstance(out, GapDetected):
                self.fail(f"gap {out.reason}", out.detail)
            elif isinstance(out, ResyncReceived):
                self.fail(f"resync {out.reason}", f"server resync instrument={out.instrument}")
            elif isinstance(out, SendResync):
                self.resync(out.instrument)

    def fail(self, name: str, detail: str) -> None:
        self.environment.events.request.fire(request_type=self.request_type, name=name, response_time=0.0,
                                             response_length=0, exception=RuntimeError(detail), context={})

    def resync(self, instrument: str) -> None:
        raise NotImplementedError


class BookcastUser(_Receiver):
    """A bookcast WebSocket client (PROTOCOL.md v1) keeping verified books of its share of the mix."""

    def _discover(self) -> list[str]:
        url = self.opts.bc_url
        if url not in _directory:
            _directory[url] = _gateway_instruments(url)
        return _directory[url]

    def on_start(self) -> None:
        super().on_start()
        self.ws = websocket.create_connection(self.opts.bc_url, timeout=self.opts.bc_recv_timeout_s)
        subscribe = wire.Subscribe(1, tuple(self.instruments), frozenset(wire.Channel(c) for c in self.channels),
                                   self.opts.bc_conflate_ms)
        self.ws.send(wire.encode_request(subscribe).decode())

    def resync(self, instrument: str) -> None:
        self.ws.send(wire.encode_request(wire.ResyncRequest(None, instrument)).decode())

    @task
    def receive(self) -> None:
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            self.fail("timeout", f"nothing from the gateway for {self.opts.bc_recv_timeout_s} s")
            return
        except websocket.WebSocketConnectionClosedException:
            self.fail("closed", "the gateway closed the connection")
            raise StopUser() from None
        self.report(orjson.loads(frame), len(frame), time.time_ns())


class NatsWsUser(_Receiver):
    """The peer: a subscriber on nats-server's WebSocket listener, with snapshots by NATS request/reply."""

    request_type = "NATS-WS"

    def _discover(self) -> list[str]:
        url = self.opts.bc_nats_ws_url
        if url not in _directory:
            _directory[url] = self._announced_instruments(url)
        return _directory[url]

    def _announced_instruments(self, url: str) -> list[str]:
        """Every instrument in the ingests' directory announcements, once some venue has announced twice
        (each ingest announces all its venues together every second, so by then all were heard)."""
        ws = websocket.create_connection(url, timeout=10)
        try:
            parser = natsproto.NatsParser()
            ws.send_binary(natsproto.connect_command("locust-discovery") + natsproto.sub_command(DIRECTORY_WILDCARD, 1)
                           + natsproto.pub_command(ANNOUNCE_REQUEST))
            heard: dict[str, int] = {}
            instruments: set[str] = set()
            while max(heard.values(), default=0) < 2:
                for msg in parser.feed(ws.recv()):
                    if isinstance(msg, natsproto.Msg):
                        heard[msg.subject] = heard.get(msg.subject, 0) + 1
                        instruments.update(e["instrument"] for e in orjson.loads(msg.payload)["instruments"])
                    elif isinstance(msg, natsproto.Ping):
                        ws.send_binary(natsproto.PONG)
            return sorted(instruments)
        finally:
            ws.close()

    def on_start(self) -> None:
        if not self.environment.parsed_options.bc_nats_ws_url:
            raise RuntimeError("NatsWsUser needs --bc-nats-ws-url: the ws:// URL of nats-server's websocket listener")
        super().on_start()
        self.parser = natsproto.NatsParser()
        self.inbox = f"_INBOX.{secrets.token_hex(8)}"
        self.ws = websocket.create_connection(self.opts.bc_nats_ws_url, timeout=self.opts.bc_recv_timeout_s)
        subjects = []
        if "book" in self.channels:
            subjects += [delta_subject(i) for i in self.instruments]
        if "trades" in self.channels:
            subjects += [trade_subject(i) for i in self.instruments]
        commands = [natsproto.connect_command("locust-nats-ws"), natsproto.sub_command(f"{self.inbox}.*", 1)]
        commands += [natsproto.sub_command(subject, sid) for sid, subject in enumerate(subjects, 2)]
        self.ws.send_binary(b"".join(commands))
        if "book" in self.channels:
            for instrument in self.instruments:
                self.resync(instrument)

    def resync(self, instrument: str) -> None:
        """Ask the ingest for a snapshot; the reply comes after every delta it already holds (same NATS
        connection, same order), so the verified book chains on from it."""
        reply = f"{self.inbox}.{secrets.token_hex(4)}"
        self.ws.send_binary(natsproto.pub_command(snapshot_subject(instrument), reply=reply))

    @task
    def receive(self) -> None:
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            self.ws.send_binary(natsproto.PING)  # a quiet market: check the server is there (PONG follows)
            return
        except websocket.WebSocketConnectionClosedException:
            self.fail("closed", "nats-server closed the connection")
            raise StopUser() from None
        recv_ns = time.time_ns()
        for msg in self.parser.feed(frame):
            if isinstance(msg, natsproto.Msg):
                self.report(orjson.loads(msg.payload), len(msg.payload), recv_ns)
            elif isinstance(msg, natsproto.Ping):
                self.ws.send_binary(natsproto.PONG)
            elif isinstance(msg, natsproto.Err):
                self.fail("nats -ERR", msg.text)
