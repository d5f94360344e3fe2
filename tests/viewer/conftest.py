from __future__ import annotations

import pytest

from tests.viewer.browser import Browser, missing


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium per test module, quit (and its chromedriver stopped by PID) after."""
    why = missing()
    if why:
        pytest.skip(why)
    b = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield b
    finally:
        b.quit()
