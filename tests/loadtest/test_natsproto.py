"""The NATS text protocol parser, fed frames cut anywhere (nats-server's WebSocket does not align them)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest import natsproto
from loadtest.natsproto import Err, Info, Msg, NatsParser, NatsProtocolError, Ok, Ping, Pong

STREAM = (b'INFO {"server_id":"x","max_payload":1048576}\r\n'
          b"MSG md.v1.coinbase.BTC-USD 2 5\r\nhello\r\n"
          b"PING\r\n"
          b"MSG _INBOX.ab.cd 1 reply.to 12\r\nline\r\nbreak!\r\n"
          b"MSG empty 3 0\r\n\r\n"
          b"+OK\r\nPONG\r\n-ERR 'Slow Consumer'\r\n")
EXPECTED = [Info({"server_id": "x", "max_payload": 1048576}), Msg("md.v1.coinbase.BTC-USD", 2, None, b"hello"), Ping(),
            Msg("_INBOX.ab.cd", 1, "reply.to", b"line\r\nbreak!"), Msg("empty", 3, None, b""), Ok(), Pong(),
            Err("Slow Consumer")]


def test_a_whole_stream_parses_in_order():
    assert NatsParser().feed(STREAM) == EXPECTED


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_any_frame_boundaries_give_the_same_messages(cuts):
    parser, out, edges = NatsParser(), [], sorted({0, len(STREAM), *cuts})
    for start, end in zip(edges, edges[1:]):
        out += parser.feed(STREAM[start:end])
    assert out == EXPECTED


@pytest.mark.parametrize("line", [b"HELLO there\r\n", b"MSG subject 1\r\n", b"MSG subject x 3\r\nabc\r\n"])
def test_garbage_is_a_protocol_error(line):
    with pytest.raises(NatsProtocolError):
        NatsParser().feed(line)


def test_commands():
    assert natsproto.sub_command("md.v1.a.b", 7) == b"SUB md.v1.a.b 7\r\n"
    assert natsproto.pub_command("md.v1.snap.a.b", reply="_INBOX.x.1") == b"PUB md.v1.snap.a.b _INBOX.x.1 0\r\n\r\n"
    assert natsproto.pub_command("s", b"hi") == b"PUB s 2\r\nhi\r\n"
    connect = natsproto.connect_command("me")
    assert connect.startswith(b"CONNECT {") and connect.endswith(b"}\r\n") and b'"verbose":false' in connect
