"""The book viewer in a real headless Chromium against a running stack (nats-server, ingest, gateway).

One scenario, in order (each step needs the previous one's state): the page loads from the gateway,
the instrument is picked through the search box, the book updates live (a looping replay at real speed),
and once that ingest is stopped the page's best bid/ask and checksum equal ``GET /v1/book/{id}``; a new ingest (a new epoch) makes the
gateway send ``resync`` and the page shows it; over that second, complete replay the page verifies every
message with 0 checksum failures; the page's Resync button gets a fresh snapshot; the "download what I
saw" file passes ``bookcast replay --check`` and ends at the gateway's book. A screenshot is saved under
run/artifacts/.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from feed.book import L2Book
from feed.model import parse_decimal
from feed.procs import stop_process
from feed.stack import bundled_capture
from tests.e2e.harness import REPO, Stack, http_json

pytestmark = pytest.mark.e2e

INSTRUMENT = "coinbase:SKL-USD"  # the busiest book of the bundled recording (~2,600 deltas in 31 s)
SPEED = 8.0  # the second, complete replay


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("viewer-stack"), workers=1)
    try:
        s.start_nats()
        s.start_gateway()
        s.start_ingest([bundled_capture()], speed=1.0, loop=True)  # live until the test stops it
        s.wait_instruments(10)
        yield s
    finally:
        s.stop()


def rest_book(stack: Stack) -> dict:
    return http_json(f"{stack.base}/v1/book/{INSTRUMENT}")


def checksum_of(snapshot: dict) -> int:
    book = L2Book(INSTRUMENT)
    book.apply_snapshot(((parse_decimal(p), parse_decimal(s)) for p, s in snapshot["bids"]),
                        ((parse_decimal(p), parse_decimal(s)) for p, s in snapshot["asks"]))
    return book.checksum()


def page_matches_rest(browser, stack: Stack) -> dict | None:
    """The REST snapshot if the page shows the same seq, best bid/ask and checksum, else None."""
    snap = rest_book(stack)
    if browser.text("h-seq") != str(snap["seq"]):
        return None
    shown = (browser.text("best-bid"), browser.text("best-ask"), browser.text("h-checksum-computed"))
    return snap if shown == (snap["bids"][0][0], snap["asks"][0][0], f"{snap['checksum']} ✓") else None


def test_viewer_live(browser, stack):
    driver = browser.driver
    driver.get(stack.base + "/")
    assert driver.title == "bookcast viewer"
    browser.wait(lambda: "10 of 10 instruments" in browser.text("list-note"), 20, "picker lists the 10 instruments")

    # pick through the search box, as a person would
    search = driver.find_element("id", "search")
    search.send_keys("skl-u")
    browser.wait(lambda: browser.text("list-note").startswith("1 of 10"), 10, "search narrows to one instrument")
    driver.find_element("css selector", f'#instruments button[data-instrument="{INSTRUMENT}"]').click()
    browser.wait(lambda: browser.text("book-state") == "live, verified", 20, "book live and verified")
    assert browser.text("title") == INSTRUMENT
    assert f"instrument={INSTRUMENT}" in driver.current_url.replace("%3A", ":")

    # it updates live: the seq shown moves while the replay runs, every update verified
    first_seq = int(browser.text("h-seq"))
    browser.wait(lambda: int(browser.text("h-seq")) >= first_seq + 20, 20, "seq moves live")
    live = browser.state()
    assert live["stats"]["verified"] >= 20 and live["stats"]["checksumFailures"] == 0

    # upstream stopped: the page's book is the gateway's book
    stop_process(stack.ingest, grace_s=10)
    snap = browser.wait(lambda: page_matches_rest(browser, stack), 20, "page shows the REST book")
    assert checksum_of(snap) == snap["checksum"]
    first_epoch = browser.text("h-epoch")
    assert first_epoch == snap["epoch"]

    # forced resync: a new ingest is a new epoch; the gateway says resync epoch_change and the page shows it
    stack.start_ingest([bundled_capture()], speed=SPEED)  # one complete pass, then it keeps serving snapshots
    browser.wait(lambda: "epoch_change 1" in browser.text("h-resyncs"), 30, "page shows the gateway's resync")
    browser.wait(lambda: browser.text("h-epoch") not in ("–", first_epoch) and browser.text("book-state") == "live, verified",
                 30, "page live on the new epoch")
    assert any("resync from gateway" in e.text and "epoch_change" in e.text
               for e in driver.find_elements("css selector", "#events li.resync"))

    # a complete replay on the new epoch: every message verified, 0 checksum failures
    final = stack.wait_ingest_done(120)
    epoch, seq = final[INSTRUMENT]
    snap = browser.wait(lambda: page_matches_rest(browser, stack), 20, "page shows the REST book after the replay")
    assert (snap["epoch"], snap["seq"]) == (epoch, seq) == (browser.text("h-epoch"), int(browser.text("h-seq")))
    state = browser.state()
    stats = state["stats"]
    assert stats["checksumFailures"] == 0 and stats["gaps"] == 0 and stats["badMessages"] == 0, stats
    # the resync snapshot and every delta after it, one by one, verified (no conflation: one per seq)
    assert state["verifiedSinceSnapshot"] == seq - state["snapshotSeq"] + 1, state
    assert state["snapshotSeq"] < seq - 1000, state  # the page watched most of the replay live
    assert browser.text("h-checksum-failures") == "0"

    # the Resync button: a fresh snapshot, counted as requested
    driver.find_element("id", "resync").click()
    browser.wait(lambda: "1 requested" in browser.text("h-resyncs"), 10, "requested resync counted")
    browser.wait(lambda: browser.state()["stats"]["snapshots"] >= 3, 10, "fresh snapshot after Resync")
    assert page_matches_rest(browser, stack)
    shot = browser.screenshot("viewer-live.png")
    assert shot.stat().st_size > 20_000

    # download what I saw: a capture that replay --check verifies, ending at the gateway's book
    recorded_before = browser.state()["recorded"]
    path = browser.download()
    lines = path.read_text().splitlines()
    assert recorded_before <= len(lines) <= browser.state()["recorded"]  # heartbeats may arrive meanwhile
    assert all(line.startswith('{"recv_ts_ns":') and '"venue":"bookcast","msg":{' in line for line in lines)
    check = subprocess.run([sys.executable, "-m", "feed.cli", "replay", "--check", str(path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    out = check.stdout
    assert re.search(r"checksum_mismatches=0 gaps=0 bad_messages=0 resyncs_received=1 \(epoch_change:1\) faults=0", out), out
    assert re.search(rf"{re.escape(INSTRUMENT)}\s+epoch={re.escape(epoch)} seq={seq}\s.*checksum={snap['checksum']}", out), out
