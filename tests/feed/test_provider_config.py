"""Provider pool config (TOML): what is accepted, what is refused with a message naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from feed.providers.config import ConfigError, load_config, parse_config, toml_text

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[scoring]
max_lag_s = 2.0

[venues.coinbase]
symbols = ["BTC-USD", "ETH-USD"]
stale_after_s = 3
[venues.coinbase.scoring]
stale_after_s = 0.8
[[venues.coinbase.providers]]
name = "cb-direct"
ws_url = "wss://advanced-trade-ws.coinbase.com"
rest_url = "https://api.coinbase.com"
weight = 2
[[venues.coinbase.providers]]
name = "cb-relay"
ws_url = "ws://127.0.0.1:9001/ws"
auth = { key_id = "k-123", private_key_file = "/secret/key.pem" }
"""


def test_good_config(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    (cb,) = cfg.venues
    assert cb.venue == "coinbase" and cb.symbols == ("BTC-USD", "ETH-USD") and cb.stale_after_s == 3.0
    assert [p.name for p in cb.providers] == ["cb-direct", "cb-relay"] and cb.providers[0].weight == 2.0
    assert cb.scoring.max_lag_s == 2.0 and cb.scoring.stale_after_s == 0.8  # global, then per-venue override
    assert "private_key_file" not in cfg.describe() and "k-123" not in cfg.describe()
    again = parse_config(__import__("tomllib").loads(toml_text(cfg)))
    assert again.venues == cfg.venues


@pytest.mark.parametrize("text,message", [
    ("", "no [venues.<venue>] table"),
    ("[venues.nasdaq]\nsymbols=['A']\n", "unknown venue"),
    ("[venues.coinbase]\nsymbols=[]\n", "symbols: must be a non-empty list"),
    ("[venues.coinbase]\nsymbols=['A']\n", "providers: give at least one"),
    ("[venues.coinbase]\nsymbols=['A']\n[[venues.coinbase.providers]]\nname='a'\n", "ws_url: must be"),
    ("[venues.coinbase]\nsymbols=['A']\n[[venues.coinbase.providers]]\nname='a'\nws_url='ws://x'\nweight=0\n",
     "weight: must be a positive number"),
    ("[venues.coinbase]\nsymbols=['A']\n[[venues.coinbase.providers]]\nname='a'\nws_url='ws://x'\n"
     "[[venues.coinbase.providers]]\nname='a'\nws_url='ws://y'\n", "used twice"),
    ("[scoring]\nmax_lag=1\n[venues.coinbase]\nsymbols=['A']\n", "scoring.max_lag: unknown scoring setting"),
    ("[scoring]\nmax_lag_s=0\n[venues.coinbase]\nsymbols=['A']\n", "max_lag_s must be > 0"),
    ("[venues.coinbase]\nsymbols=['A']\n[[venues.coinbase.providers]]\nname='a'\nws_url='ws://x'\nurl='y'\n",
     "unknown key(s) url"),
    ("not toml [", "not valid TOML"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_ingest_check_prints_providers_never_auth_and_bad_config_exits_2(tmp_path):
    good = tmp_path / "p.toml"
    good.write_text(GOOD)
    out = subprocess.run([sys.executable, "-m", "feed.cli", "ingest", "--config", str(good), "--check"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "cb-relay" in out.stdout and "auth=<hidden>" in out.stdout and "k-123" not in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[venues.coinbase]\nsymbols=[]\n")
    out = subprocess.run([sys.executable, "-m", "feed.cli", "ingest", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "symbols" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "feed.cli", "up", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert missing.returncode == 2 and "provider config not found" in missing.stderr
