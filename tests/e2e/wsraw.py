"""A deliberately minimal WebSocket client on a raw socket, for tests that need control aiohttp hides:
a tiny receive buffer and reading at a chosen pace (a slow consumer). RFC 6455 framing, text only."""
from __future__ import annotations

import base64
import os
import socket
import struct

import orjson


class RawWebSocket:
    def __init__(self, host: str, port: int, path: str = "/v1/ws", rcvbuf_bytes: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head[:100]!r}")
        self.buf = b""
        self.close_code: int | None = None

    def send_json(self, obj) -> None:
        self._send(0x1, orjson.dumps(obj))

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.setblocking(True)
        self.sock.sendall(header + mask + masked)

    async def recv_some(self, max_bytes: int = 4096, timeout_s: float = 10.0) -> bool:
        """Read up to ``max_bytes`` into the buffer without blocking the event loop; False at end of stream."""
        import asyncio

        self.sock.setblocking(False)
        try:
            chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, max_bytes), timeout_s)
        except (ConnectionResetError, TimeoutError):
            return False
        self.buf += chunk
        return bool(chunk)

    def frames(self):
        """Yield complete frames in the buffer as (opcode, payload)."""
        while len(self.buf) >= 2:
            opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, off = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < off + n:
                return
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            if opcode == 9:  # ping: a well-behaved client answers, however slowly it reads
                self._send(0xA, payload)
            if opcode == 8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            yield opcode, payload

    def close(self) -> None:
        self.sock.close()
