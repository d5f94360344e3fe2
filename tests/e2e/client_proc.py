"""A fast, lean client in its own process: checks that every instrument's stream is contiguous (each
delta's epoch and prev_seq chain on the last seq held) until SIGTERM, then prints its counts as JSON.

    python -m tests.e2e.client_proc WS_URL INSTRUMENT [INSTRUMENT ...]
"""
from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import orjson


async def main(url: str, instruments: list[str]) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    held: dict[str, tuple[str, int]] = {}
    counts = {"deltas": 0, "snapshots": 0, "gaps": 0, "resyncs": 0, "closed": None}
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "instruments": instruments}).decode())
        reader = asyncio.ensure_future(ws.receive())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                reader.cancel()
                break
            msg = reader.result()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                counts["closed"] = ws.close_code
                break
            m = orjson.loads(msg.data)
            t = m["type"]
            if t == "snapshot":
                held[m["instrument"]] = (m["epoch"], m["seq"])
                counts["snapshots"] += 1
                if counts["snapshots"] == len(instruments):
                    print("READY", flush=True)
            elif t == "delta":
                inst = m["instrument"]
                if held.get(inst) != (m["epoch"], m["prev_seq"]):
                    counts["gaps"] += 1
                held[inst] = (m["epoch"], m["seq"])
                counts["deltas"] += 1
            elif t == "resync":
                counts["resyncs"] += 1
            reader = asyncio.ensure_future(ws.receive())
    print(orjson.dumps(counts).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2:])))
