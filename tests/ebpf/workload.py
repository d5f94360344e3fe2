"""A known workload for the eBPF tests, in its own process so it can be traced (or not) by PID.

    python tests/ebpf/workload.py MODE ARGS...

Prints ``ready`` (plus a port for ``tcp``), waits for a line on stdin, runs MODE, prints ``done`` and
exits. So a test can register the PID with the probes between ``ready`` and the go line, and the counts
hold only the workload's own calls. Modes:

    sendto N            N sendto() of 64 bytes on a UDP socket
    recv N MS           N recvfrom() that block MS ms each (SO_RCVTIMEO; they end with EAGAIN)
    sleep MS            a second thread sleeps MS ms (off CPU, interruptible)
    contend MS          this process and a forked child both spin MS ms pinned to one CPU
    queue N MS          socketpair: N times send 1 byte, leave it MS ms, then read it
    tcp S MS            listen on TCP; after go, send 100 bytes every MS ms for S seconds to the one client
    netrecv N MS        TCP over loopback: N times send 64 bytes to itself, leave them MS ms, then read them
    unixrecv N MS       the same over an AF_UNIX stream socketpair (never enters the network stack)
    backlog B N MS [defer]  listen on TCP with backlog B (prints its port; defer: TCP_DEFER_ACCEPT, a
                        connection joins the accept queue only with its first data); after go, accept N
                        connections (made by the test meanwhile) MS ms apart, greeting each with one byte
    udpflood N          N sendto() of 64 bytes over loopback UDP (the receive side runs in NET_RX softirq)
    devnull N           N write() of 64 bytes to /dev/null (no network at all)
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main(mode: str, *args: str) -> None:
    listener = None
    if mode == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        print("ready", listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
    elif mode == "backlog":
        listener = socket.socket()
        if args[3:] == ("defer",):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        listener.bind(("127.0.0.1", 0))
        listener.listen(int(args[0]))
        print("ready", listener.getsockname()[1], flush=True)
    else:
        print("ready", flush=True)
    sys.stdin.readline()
    if mode == "sendto":
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(int(args[0])):
            tx.sendto(b"x" * 64, rx.getsockname())
    elif mode == "recv":
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        ms = int(args[1])
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", ms // 1000, ms % 1000 * 1000))
        for _ in range(int(args[0])):
            try:
                rx.recv(100)
            except BlockingIOError:
                pass
    elif mode == "sleep":
        t = threading.Thread(target=time.sleep, args=(int(args[0]) / 1000,))
        t.start()
        t.join()
    elif mode == "contend":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        child = os.fork()
        spin(int(args[0]) / 1000)
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
    elif mode == "queue":
        a, b = socket.socketpair()
        a.send(b"w")
        b.recv(1)               # the socket's first read: it is learnt as ours, not measured
        for _ in range(int(args[0])):
            a.send(b"x")
            time.sleep(int(args[1]) / 1000)
            b.recv(1)
    elif mode == "tcp":
        end = time.monotonic() + float(args[0])
        while time.monotonic() < end:
            conn.sendall(b"y" * 100)
            time.sleep(int(args[1]) / 1000)
        conn.close()
    elif mode in ("netrecv", "unixrecv"):
        if mode == "netrecv":
            server = socket.create_server(("127.0.0.1", 0))
            tx = socket.create_connection(server.getsockname())
            tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rx = server.accept()[0]
        else:
            rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(int(args[0])):
            tx.send(b"n" * 64)
            time.sleep(int(args[1]) / 1000)
            rx.recv(100)
    elif mode == "backlog":
        accepted = []
        for _ in range(int(args[1])):
            time.sleep(int(args[2]) / 1000)
            accepted.append(listener.accept()[0])
            accepted[-1].send(b"a")
    elif mode == "udpflood":
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(int(args[0])):
            tx.sendto(b"f" * 64, rx.getsockname())
            if i % 64 == 63:
                rx.setblocking(False)
                try:
                    while rx.recv(100):
                        pass
                except BlockingIOError:
                    pass
    elif mode == "devnull":
        fd = os.open("/dev/null", os.O_WRONLY)
        for _ in range(int(args[0])):
            os.write(fd, b"d" * 64)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
