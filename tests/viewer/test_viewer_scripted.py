"""The book viewer in a real headless Chromium: the checksum code on PROTOCOL.md's vectors, and the page's
handling of what the real gateway does not send yet or should never send, from a scripted peer
(``tests/viewer/scripted.py``): auth (section 8), ``instrument_status`` and a snapshot ``status``
(section 11), a wrong checksum, a seq gap, a frame that is not JSON, a malformed delta, ``shutdown``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from feed import checksum as py_checksum
from feed import wire
from feed.book import L2Book
from feed.model import LevelChange, Side
from tests.e2e.harness import REPO
from tests.viewer.scripted import ScriptedGateway

INSTRUMENT = "polymarket:btc-1h-1765450800-up"
TOKEN = "s3cret.jwt.token"

# PROTOCOL.md section 6 test vectors: (bids best first, asks best first, expected checksum)
VECTORS = [
    ([], [], 2343686810),
    ([["0.52", "100"]], [["0.55", "120.50"]], 2581317190),
    ([["0.520", "1.000E2"], ["0.5", "7612"]], [["0.55", "0120.50"], ["0.6", "10"]], 18113738),
    ([[f"0.{40 - i:02d}", str(100 + i)] for i in range(12)], [[f"0.{41 + i:02d}", str(200 + i)] for i in range(12)],
     2246303379),
]


@pytest.fixture(scope="module")
def gateway():
    gw = ScriptedGateway([INSTRUMENT, "polymarket:btc-1h-1765450800-down", "coinbase:BAND-GBP"], token=TOKEN).start()
    try:
        yield gw
    finally:
        gw.stop()


def test_checksum_vectors_in_the_browser(browser, gateway):
    browser.driver.get(gateway.base + "/")
    results = browser.driver.execute_async_script("""
        const [vectors, done] = arguments;
        Promise.all([import('/static/checksum.js'), import('/static/decimal.js')]).then(([c, d]) => done({
            sums: vectors.map(([bids, asks]) => c.checksum(bids, asks)),
            strings: vectors.map(([bids, asks]) => c.checksumString(bids, asks)),
            canonical: ["0.50", "1.000E2", "0120.50", "0", "000", "1e-3", "12.3400e1", ".5", "7612"].map(d.canonical),
            bad: ["", "-1", "abc", "1e", "."].map((t) => { try { d.canonical(t); return "accepted"; } catch (e) { return e.name; } }),
            math: [d.add("0.1", "0.2"), d.sub("0.55", "0.52"), d.sub("0.5", "0.52"), d.mid("0.52", "0.55"),
                   d.compare("0.5", "0.55"), d.compare("10", "9.99"), d.compare("0.6", "0.55")],
        })).catch((e) => done({error: String(e)}));
    """, [[b, a] for b, a, _ in VECTORS])
    assert "error" not in results, results
    assert results["sums"] == [v[2] for v in VECTORS]
    assert results["strings"][:3] == ["|", "0.55:120.5|0.52:100", "0.55:120.5,0.6:10|0.52:100,0.5:7612"]
    assert results["strings"][3].count(",") == 18  # top 10 of each side only
    for (bids, asks, expected), s in zip(VECTORS, results["strings"]):  # the same as the Python reference
        canon = lambda levels: [(format(Decimal(p).normalize(), "f"), format(Decimal(q).normalize(), "f")) for p, q in levels]  # noqa: E731
        assert py_checksum.checksum_string(canon(bids), canon(asks)) == s
    assert results["canonical"] == ["0.5", "100", "120.5", "0", "0", "0.001", "123.4", "0.5", "7612"]
    assert results["bad"] == ["DecimalError"] * 5
    assert results["math"] == ["0.3", "0.03", "-0.02", "0.535", -1, 1, 1]


class Script:
    """The book the scripted peer publishes, with checksums from the Python reference (feed.book)."""

    def __init__(self) -> None:
        self.book = L2Book(INSTRUMENT)
        self.book.apply_snapshot([(Decimal("0.52"), Decimal("100")), (Decimal("0.51"), Decimal("250"))],
                                 [(Decimal("0.55"), Decimal("120.5")), (Decimal("0.56"), Decimal("80"))])
        self.seq = 10

    def stamps(self) -> dict:
        now = time.time_ns()
        return {"ts_event_ns": now - 3_000_000, "ts_ingest_ns": now - 2_000_000, "ts_publish_ns": now - 1_000_000}

    def snapshot(self, **extra) -> dict:
        s = self.stamps()
        msg = wire.snapshot_message(INSTRUMENT, "e1", self.seq, self.book, ts_event_ns=s["ts_event_ns"],
                                    ts_ingest_ns=s["ts_ingest_ns"], ts_publish_ns=s["ts_publish_ns"])
        return {**msg, **extra}

    def delta(self, side: str, price: str, size: str, *, corrupt: bool = False, skip: int = 0) -> dict:
        self.book.apply_changes([LevelChange(Side(side), Decimal(price), Decimal(size))])
        prev, self.seq = self.seq + skip, self.seq + 1 + skip
        return {"type": "delta", "instrument": INSTRUMENT, "epoch": "e1", "seq": self.seq, "prev_seq": prev,
                "changes": [[side, price, size]], "checksum": self.book.checksum() ^ (1 if corrupt else 0),
                **self.stamps()}


def test_auth_status_and_faults(browser, gateway, tmp_path):
    b, driver = browser, browser.driver
    driver.get(gateway.base + "/")

    # no token: the gateway answers 401 (REST and upgrade) and the page says what to do
    b.wait(lambda: "401" in b.text("banner"), 20, "page reports 401 unauthorized")
    assert gateway.rest_auth[-1] is None and gateway.ws_tokens and gateway.ws_tokens[-1] is None
    driver.find_element("id", "token").send_keys(TOKEN)
    driver.find_element("css selector", "#token-form button").click()
    b.wait(lambda: "3 of 3 instruments" in b.text("list-note") and b.state()["conn"] == "open", 20, "page connected with the token")
    assert gateway.rest_auth[-1] == f"Bearer {TOKEN}"
    assert gateway.ws_tokens[-1] == TOKEN
    assert not b.driver.find_element("id", "banner").is_displayed()

    # pick with the search box and Enter
    search = driver.find_element("id", "search")
    search.send_keys("1765450800-up\n")
    b.wait(lambda: gateway.ops("subscribe"), 10, "subscribe sent")
    sub = gateway.ops("subscribe")[-1]
    assert sub["instruments"] == [INSTRUMENT] and sub["channels"] == ["book", "trades"] and "resume" not in sub

    # a snapshot with status (section 11), then instrument_status changes it
    script = Script()
    gateway.send(script.snapshot(status="stale"))
    b.wait(lambda: b.text("book-state") == "live, verified", 10, "snapshot verified")
    assert b.text("status") == "stale"
    assert (b.text("best-bid"), b.text("best-ask"), b.text("spread"), b.text("mid")) == ("0.52", "0.55", "0.03", "0.535")
    gateway.send({"type": "instrument_status", "instrument": INSTRUMENT, "status": "crossed",
                  "reason": "venue_crossed", "since_ns": 1765450800_000_000_000})
    b.wait(lambda: b.text("status") == "crossed · venue_crossed", 10, "instrument_status shown")
    assert b.text("h-status-since") == "11:00:00.000"

    # a good delta, then one whose checksum is wrong: counted, resync sent, book dropped
    gateway.send(script.delta("bid", "0.52", "90"))
    b.wait(lambda: b.text("h-seq") == "11" and b.text("best-bid-size") == "90", 10, "delta applied")
    assert b.text("h-prev-seq") == "10" and b.text("h-checksum-computed").endswith("✓")
    gateway.send(script.delta("ask", "0.55", "100", corrupt=True))
    b.wait(lambda: b.text("h-checksum-failures") == "1", 10, "checksum failure counted")
    b.wait(lambda: gateway.ops("resync"), 10, "page sent resync")
    assert gateway.ops("resync")[-1] == {"op": "resync", "instrument": INSTRUMENT}
    assert b.text("book-state") == "awaiting snapshot"
    gateway.send(script.snapshot())
    b.wait(lambda: b.text("book-state") == "live, verified" and b.text("h-seq") == "12", 10, "live again")

    # a seq gap: counted as a gap, resync sent
    gateway.send(script.delta("bid", "0.5", "10", skip=1))
    b.wait(lambda: b.text("h-gaps").startswith("1 (seq 1"), 10, "seq gap counted")
    b.wait(lambda: len(gateway.ops("resync")) == 2, 10, "second resync sent")
    gateway.send(script.snapshot())
    b.wait(lambda: b.text("book-state") == "live, verified" and b.text("h-seq") == "14", 10, "live after the gap")

    # bad input: a frame that is not JSON, a delta with a malformed change; the page keeps going
    gateway.send("this is not json{")
    gateway.send({"type": "delta", "instrument": INSTRUMENT, "epoch": "e1", "seq": 15, "prev_seq": 14,
                  "changes": [["middle", "0.5", "1"]], "checksum": 0})
    b.wait(lambda: b.state()["stats"]["badMessages"] == 1 and b.state()["badFrames"] == 1, 10, "bad input counted")
    b.wait(lambda: b.text("h-bad").startswith("2"), 10, "bad input shown")
    b.wait(lambda: len(gateway.ops("resync")) == 3, 10, "resync after the malformed delta")
    gateway.send(script.snapshot(status="ok"))
    gateway.send({"type": "trade", "instrument": INSTRUMENT, "price": "0.53", "size": "12.5", "side": "buy",
                  **script.stamps()})
    gateway.send({"type": "heartbeat", "seqs": {INSTRUMENT: ["e1", 14]}})
    b.wait(lambda: b.text("status") == "ok" and b.state()["stats"]["heartbeats"] == 1
           and "0.53" in b.text("trades-body"), 10, "status ok, trade and heartbeat shown")
    assert not b.text("h-heartbeat-age").startswith("none")
    assert b.text("h-checksum-failures") == "1" and b.text("book-state") == "live, verified"
    events = b.text("events")
    for needle in ("checksum_mismatch", "seq_gap", "bad_message", "frame is not JSON", "status=crossed"):
        assert needle in events, events
    b.screenshot("viewer-faults.png")

    # shutdown: the page reconnects after the delay and resumes from the seq it holds
    subs_before = len(gateway.ops("subscribe"))
    gateway.send({"type": "shutdown", "reconnect_after_ms": 200})
    gateway.close_clients(1001)
    b.wait(lambda: len(gateway.ops("subscribe")) > subs_before, 20, "page resubscribed after shutdown")
    resumed = gateway.ops("subscribe")[-1]
    assert resumed["resume"] == {INSTRUMENT: {"epoch": "e1", "seq": 14}}
    assert gateway.ws_tokens[-1] == TOKEN

    # the download: replay --check finds exactly the faults the page saw, with their lines
    path = b.download()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["venue"] for r in records} == {"bookcast"}
    assert "this is not json{" in [r["msg"] for r in records]
    check = subprocess.run([sys.executable, "-m", "feed.cli", "replay", "--check", str(path)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1, check.stdout + check.stderr
    out = check.stdout
    assert "checksum_mismatches=1 gaps=1" in out and "faults=4" in out, out
    for needle in ("checksum_mismatch: checksum mismatch", "seq_gap: seq gap", "bad_message:", "not a JSON object"):
        assert needle in out, out
    assert f"{INSTRUMENT}" in out and "seq=14" in out, out
