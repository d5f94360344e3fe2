"""Captures whose deltas come before (or without) any snapshot: said plainly, never a silent empty feed."""
from __future__ import annotations

import gzip
import itertools
import logging
import subprocess
import sys
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from feed.ingest import Ingest, IngestConfig
from feed.stack import bundled_capture

REPO = Path(__file__).resolve().parents[2]


def without_snapshots(tmp_path: Path, products: set[str] | None, n: int = 2000) -> Path:
    """The first ``n`` lines of the bundled real Coinbase capture, minus the snapshots of ``products`` (all if None)."""
    out = tmp_path / "no-snapshot.jsonl"
    with gzip.open(bundled_capture(), "rb") as src, open(out, "wb") as dst:
        for line in itertools.islice(src, n):
            msg = orjson.loads(line)["msg"]
            if msg.get("type") == "snapshot" and (products is None or msg.get("product_id") in products):
                continue
            dst.write(line)
    return out


def test_replay_check_exits_1_naming_instruments_without_snapshot(tmp_path):
    capture = without_snapshots(tmp_path, {"BAND-GBP", "SKL-USD"})
    out = subprocess.run([sys.executable, "-m", "feed.cli", "replay", "--check", str(capture)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1, out.stdout
    assert "2 instruments have no snapshot" in out.stdout
    assert "coinbase:BAND-GBP" in out.stdout.split("have no snapshot")[1]
    summary = dict(kv.split("=") for kv in out.stdout.splitlines()[0].split())
    assert summary["instruments"] == "8" and int(summary["dropped_deltas"]) > 0


class FakeNats:
    def __init__(self) -> None:
        self.published = []

    async def publish(self, subject, payload, headers=None) -> None:
        self.published.append((subject, orjson.loads(payload)))


async def test_ingest_warns_naming_instrument_and_count_and_lists_it_in_status(tmp_path, caplog):
    capture = without_snapshots(tmp_path, {"BAND-GBP"})
    ingest = Ingest(IngestConfig(captures=[capture], speed=None, epoch_base="t"), registry=CollectorRegistry())
    ingest.nc = FakeNats()
    with caplog.at_level(logging.WARNING, logger="bookcast.ingest"):
        await ingest.run()
    dropped = ingest.status()["no_snapshot"]
    assert list(dropped) == ["coinbase:BAND-GBP"] and dropped["coinbase:BAND-GBP"] > 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("coinbase:BAND-GBP" in m and "delta before any snapshot" in m for m in lines)
    assert f"instrument coinbase:BAND-GBP: {dropped['coinbase:BAND-GBP']} deltas dropped" in "\n".join(lines)
    # the capture ended: every instrument it fed is stale now, and says so
    st = [m for _, m in ingest.nc.published if m.get("type") == "instrument_status"]
    assert {m["status"] for m in st} == {"stale"} and {m["reason"] for m in st} == {"upstream_ended"}
    assert len(st) == 9


def _pm(ts_ms: int, **fields) -> dict:
    return {"event_type": fields.pop("event_type"), "market": "0xm", "timestamp": str(ts_ms), **fields}


async def test_replayed_capture_left_crossed_after_a_burst_is_announced_then_cleared(tmp_path):
    """A recorder that missed the removals of a crossing order: the book stays crossed after the burst. The
    ingest says so (status crossed, counted) instead of serving it as fine, and clears it once the next
    full book repairs it; the epoch does not change (a capture cannot be resynced, the book follows it)."""
    def book(ts, bids, asks):
        return _pm(ts, event_type="book", asset_id="tok", bids=[{"price": p, "size": s} for p, s in bids],
                   asks=[{"price": p, "size": s} for p, s in asks])

    def change(ts, side, price, size):
        return _pm(ts, event_type="price_change", price_changes=[
            {"asset_id": "tok", "price": price, "size": size, "side": side, "hash": "h"}])

    msgs = [book(1000, [("0.40", "10")], [("0.42", "8"), ("0.44", "5")]),
            change(2000, "BUY", "0.43", "12"),  # crosses 0.42; its removal never recorded
            change(3000, "BUY", "0.38", "1"),
            book(4000, [("0.43", "4"), ("0.40", "10")], [("0.44", "5")])]
    capture = tmp_path / "pm.jsonl"
    capture.write_bytes(b"".join(orjson.dumps({"recv_ts_ns": i + 1, "venue": "polymarket", "msg": m}) + b"\n"
                                 for i, m in enumerate(msgs)))
    registry = CollectorRegistry()
    ingest = Ingest(IngestConfig(captures=[capture], speed=None, epoch_base="t"), registry=registry)
    ingest.nc = FakeNats()
    await ingest.run()
    inst = "polymarket:tok"
    st = [m for _, m in ingest.nc.published if m.get("type") == "instrument_status"]
    assert [(m["status"], m["reason"]) for m in st] == [("crossed", "crossed_after_burst"), ("ok", ""),
                                                       ("stale", "upstream_ended")]
    assert registry.get_sample_value("bookcast_ingest_integrity_faults_total",
                                     {"venue": "polymarket", "kind": "crossed"}) == 1
    deltas = [m for _, m in ingest.nc.published if m.get("type") == "delta"]
    assert {d["epoch"] for d in deltas} == {"t"} and [d["seq"] for d in deltas] == [1, 2, 3]
    assert not ingest.engine.instruments[inst].book.is_crossed()


async def test_polymarket_hash_travels_as_venue_hash_on_snapshots_and_deltas(tmp_path, shared_data):
    """Real Polymarket ``book`` messages with ``hash`` (passed through, never verified), then a price_change."""
    books = [orjson.loads(line) for line in (shared_data / "polymarket" / "ws-book-with-hash-20260212.jsonl")
             .read_bytes().splitlines() if line.strip()]
    first = books[0]
    best_bid = max(first["bids"], key=lambda lv: float(lv["price"]))["price"] if first["bids"] else "0.01"
    change = {"event_type": "price_change", "market": first["market"], "timestamp": str(int(first["timestamp"]) + 1),
              "price_changes": [{"asset_id": first["asset_id"], "price": best_bid, "size": "1", "side": "BUY",
                                 "hash": "0xfeedface"}]}
    capture = tmp_path / "pm-hash.jsonl"
    capture.write_bytes(b"".join(orjson.dumps({"recv_ts_ns": i + 1, "venue": "polymarket", "msg": m}) + b"\n"
                                 for i, m in enumerate([*books, change])))
    ingest = Ingest(IngestConfig(captures=[capture], speed=None, epoch_base="t"), registry=CollectorRegistry())
    ingest.nc = FakeNats()
    await ingest.run()
    inst = f"polymarket:{first['asset_id']}"
    other = f"polymarket:{books[1]['asset_id']}"
    assert ingest.snapshot(other)["venue_hash"] == books[1]["hash"]
    deltas = [m for _, m in ingest.nc.published if m.get("type") == "delta" and m["instrument"] == inst]
    assert deltas and deltas[-1]["venue_hash"] == "0xfeedface"
    assert ingest.snapshot(inst)["venue_hash"] == "0xfeedface"
