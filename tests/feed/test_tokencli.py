"""``bookcast token``: keygen, issue and verify as an operator runs them (in-process, real files)."""
from __future__ import annotations

import json
import stat

import pytest

from feed.cli import main
from feed.tokencli import parse_ttl_s


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
def test_keygen_issue_verify_round_trip(tmp_path, capsys, alg):
    prefix = tmp_path / "keys" / "k"
    code, _, err = run(capsys, "token", "keygen", "--alg", alg, "--kid", "2026-12", "--out", str(prefix))
    assert code == 0 and "--auth-jwks" in err
    key_file = prefix.with_name("k.secret" if alg == "HS256" else "k.key.pem")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_flag = "--hs256-secret-file" if alg == "HS256" else "--rs256-private-key-file"
    code, token, err = run(capsys, "token", "issue", "--sub", "desk-7", "--instruments", "polymarket:*",
                           "--instruments", "coinbase:BTC-USD", "--ttl", "1h", key_flag, str(key_file), "--kid", "2026-12")
    token = token.strip()
    assert code == 0 and token.count(".") == 2
    assert token not in err and "desk-7" in err  # the summary never prints the token
    jwks = str(prefix.with_name("k.jwks.json"))
    code, out, _ = run(capsys, "token", "verify", "--auth-jwks", jwks, token)
    assert code == 0
    claims = json.loads(out)
    assert claims["sub"] == "desk-7" and claims["instruments"] == ["polymarket:*", "coinbase:BTC-USD"]
    code, _, err = run(capsys, "token", "verify", "--auth-jwks", jwks, token[:-4] + "AAAA")
    assert code == 1 and "bad_signature" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    secret = tmp_path / "s"
    secret.write_text("short\n")
    assert run(capsys, "token", "issue", "--sub", "x", "--instruments", "a:*", "--ttl", "1h",
               "--hs256-secret-file", str(secret))[0] == 2  # too short a secret
    secret.write_text("x" * 40 + "\n")
    assert run(capsys, "token", "issue", "--sub", "x", "--instruments", "a:\\b", "--ttl", "1h",
               "--hs256-secret-file", str(secret))[0] == 2
    assert run(capsys, "token", "issue", "--sub", "x", "--instruments", "a:*", "--ttl", "soon",
               "--hs256-secret-file", str(secret))[0] == 2
    assert run(capsys, "token", "verify", "a.b.c")[0] == 2  # no key options
    with pytest.raises(SystemExit) as info:
        main(["token", "issue", "--sub", "x"])
    assert info.value.code == 2


@pytest.mark.parametrize("text,seconds", [("90", 90), ("45s", 45), ("30m", 1800), ("1h", 3600), ("7d", 604800),
                                          ("1.5h", 5400)])
def test_ttl(text, seconds):
    assert parse_ttl_s(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-1h", "0", "h"])
def test_bad_ttl(text):
    with pytest.raises(ValueError):
        parse_ttl_s(text)
