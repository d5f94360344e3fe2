"""Debian's headless Chromium driven by selenium, for the book viewer tests.

Chromium and chromedriver come from Debian (``chromium``, ``chromium-driver``; ``scripts/setup.sh``
installs them as root). Every browser gets a fresh ``--user-data-dir`` and download directory; the
chromedriver process is stopped by its PID after ``quit()`` if it outlived it.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feed.procs import stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--window-size=1600,1300",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "run" / "artifacts"


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} not installed (Debian package {package}; `sudo scripts/setup.sh --system-only`)"
    return None


class Browser:
    """One headless Chromium. ``downloads`` is its download directory."""

    def __init__(self, tmp: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tmp / "profile"
        self.downloads = tmp / "downloads"
        self.profile.mkdir(parents=True)
        self.downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ARGS:
            options.add_argument(arg)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_experimental_option("prefs", {
            "download.default_directory": str(self.downloads), "download.prompt_for_download": False,
        })
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.service = Service(str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log"))
        self.driver = webdriver.Chrome(options=options, service=self.service)
        self.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                    {"behavior": "allow", "downloadPath": str(self.downloads)})

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            proc = getattr(self.service, "process", None)
            if proc is not None:
                stop_process(proc, grace_s=5)

    # -- helpers ------------------------------------------------------------------------------------
    def text(self, element_id: str) -> str:
        return self.driver.find_element("id", element_id).text

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
        """Poll ``predicate`` until it returns something truthy; return it. On timeout, fail with ``what``
        and the page's console messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not true after {timeout_s} s; page: {dump(self.state())}; console: {self.console()[-5:]}")
            time.sleep(interval_s)

    def console(self) -> list[str]:
        try:
            return [f"{e['level']} {e['message']}" for e in self.driver.get_log("browser")]
        except Exception:  # noqa: BLE001 - diagnostics only
            return []

    def state(self) -> dict[str, Any]:
        """What the page's stream core holds for its current instrument (read from the page itself)."""
        return self.driver.execute_script("""
            const v = window.bookcastViewer; if (!v) return null;
            const i = v.instrument ? v.stream.instruments.get(v.instrument) : null;
            const b = i && i.book;
            return {instrument: v.instrument, conn: v.connState, stats: v.stream.stats,
                    state: i ? i.state : null, epoch: i ? i.epoch : null, seq: i ? i.seq : null,
                    status: i ? i.status : null, statusReason: i ? i.statusReason : null,
                    checksumSent: i ? i.checksumSent : null, checksumComputed: i ? i.checksumComputed : null,
                    bestBid: b ? b.bestBid() : null, bestAsk: b ? b.bestAsk() : null,
                    snapshotSeq: i ? i.snapshotSeq : null, verifiedSinceSnapshot: i ? i.verifiedSinceSnapshot : null,
                    recorded: v.recorder.count, badFrames: v.badFrames, frames: v.framesReceived,
                    workMs: v.workMs, workMaxMs: v.workMaxMs, renders: v.renders, renderMs: v.renderMs,
                    renderMaxMs: v.renderMaxMs};
        """)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path

    def download(self, button_id: str = "download", timeout_s: float = 20) -> Path:
        """Click the download button and return the file once Chromium finished writing it."""
        before = set(self.downloads.iterdir())
        self.driver.find_element("id", button_id).click()

        def done() -> Path | None:
            new = [p for p in self.downloads.iterdir() if p not in before and not p.name.endswith(".crdownload")]
            return new[0] if new else None

        return self.wait(done, timeout_s, "download written")


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:2000]


os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager: no telemetry (it is not used: paths given)
