"""``bookcast token``: issue, check and make keys for the gateway's JWTs (PROTOCOL.md section 8, ``feed.auth``).

* ``issue``  prints one signed token on stdout (and what it grants on stderr, never the token itself).
* ``verify`` checks a token as a gateway with the same key options would, and prints its claims or the
  reason it is refused (exit 1).
* ``keygen`` writes a new HS256 secret or RS256 key pair, plus a one-key JWKS for ``--auth-jwks``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

EXAMPLES = """examples:
  bookcast token keygen --alg HS256 --kid 2026-12 --out run/keys/hs        # run/keys/hs.secret + hs.jwks.json
  bookcast token keygen --alg RS256 --kid 2026-12 --out run/keys/rs        # rs.key.pem, rs.pub.pem, rs.jwks.json
  bookcast token issue --sub desk-7 --instruments 'polymarket:*' --ttl 1h --hs256-secret-file run/keys/hs.secret --kid 2026-12
  bookcast token issue --sub viewer --instruments 'coinbase:BTC-USD' --instruments 'coinbase:ETH-*' --ttl 30m \\
      --rs256-private-key-file run/keys/rs.key.pem --kid 2026-12
  bookcast token verify --auth-jwks run/keys/hs.jwks.json "$TOKEN"        # claims, or the reason it is refused

Patterns (one per --instruments): '*' matches any run of characters, '\\*' is a literal star and '\\\\' a
literal backslash; everything else is literal and the whole id must match ('polymarket:*', 'coinbase:BTC-USD')."""

_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_TTL_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl_s(text: str) -> int:
    """``90``, ``45s``, ``30m``, ``1h``, ``7d`` -> whole seconds.

    Raises:
        ValueError: another form, or not positive.
    """
    m = _TTL.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 90, 45s, 30m, 1h or 7d")
    seconds = int(float(m.group(1)) * _TTL_UNIT_S[m.group(2)])
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    """The verification-key options shared with ``bookcast gateway`` (auth is on when any is given)."""
    p.add_argument("--auth-jwks", type=Path, action="append", default=[], metavar="FILE",
                   help="JWK Set file (RFC 7517) of accepted keys, each with a kid (repeatable)")
    p.add_argument("--auth-hs256-secret-file", action="append", default=[], metavar="[KID=]FILE",
                   help="an HS256 secret file; without KID= it is the key for tokens without a kid (repeatable)")
    p.add_argument("--auth-rs256-public-key-file", action="append", default=[], metavar="[KID=]FILE",
                   help="an RS256 public key PEM file (repeatable)")
    p.add_argument("--auth-leeway-s", type=float, default=0.0,
                   help="clock skew allowed on exp/nbf, seconds (default %(default)s)")
    p.add_argument("--auth-issuer", help="require this 'iss' claim")
    p.add_argument("--auth-audience", help="require this value in the 'aud' claim")


def verifier_from_args(args: argparse.Namespace):
    """The ``TokenVerifier`` the key options describe, or None when none is given (auth off).

    Raises:
        KeyConfigError: a key file is missing or unusable.
    """
    from feed.auth import TokenVerifier, load_key_set

    if not (args.auth_jwks or args.auth_hs256_secret_file or args.auth_rs256_public_key_file):
        return None
    keys = load_key_set(jwks_files=args.auth_jwks, hs256_secret_files=args.auth_hs256_secret_file,
                        rs256_public_key_files=args.auth_rs256_public_key_file)
    return TokenVerifier(keys, leeway_s=args.auth_leeway_s, issuer=args.auth_issuer, audience=args.auth_audience)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="token_command", required=True, metavar="action")
    fmt = argparse.RawDescriptionHelpFormatter

    i = sub.add_parser("issue", help="print a signed token", epilog=EXAMPLES, formatter_class=fmt)
    i.add_argument("--sub", required=True, help="the subject: who the token is for (logged by the gateway)")
    i.add_argument("--instruments", action="append", required=True, metavar="PATTERN",
                   help="an instrument pattern the token grants (repeatable), e.g. 'polymarket:*'")
    i.add_argument("--ttl", required=True, help="lifetime: 90, 45s, 30m, 1h, 7d")
    i.add_argument("--not-before", type=float, metavar="UNIX_S", help="optional nbf claim (seconds since the epoch)")
    i.add_argument("--kid", help="key id to put in the header (the gateway picks its key by it)")
    i.add_argument("--iss", help="optional iss claim")
    i.add_argument("--aud", help="optional aud claim")
    key = i.add_mutually_exclusive_group(required=True)
    key.add_argument("--hs256-secret-file", type=Path, help="sign HS256 with this secret file")
    key.add_argument("--rs256-private-key-file", type=Path, help="sign RS256 with this PEM private key")

    v = sub.add_parser("verify", help="check a token with the gateway's key options", epilog=EXAMPLES,
                       formatter_class=fmt)
    v.add_argument("token", help="the token, or - to read it from stdin")
    add_key_arguments(v)

    k = sub.add_parser("keygen", help="write a new HS256 secret or RS256 key pair and a JWKS", epilog=EXAMPLES,
                       formatter_class=fmt)
    k.add_argument("--alg", choices=["HS256", "RS256"], required=True)
    k.add_argument("--kid", required=True, help="key id (e.g. the month it starts being used)")
    k.add_argument("--out", type=Path, required=True, help="path prefix of the files written")
    k.add_argument("--force", action="store_true", help="overwrite existing files")


def main(args: argparse.Namespace) -> int:
    from feed.auth import AuthError, InvalidPattern, KeyConfigError

    try:
        if args.token_command == "issue":
            return _issue(args)
        if args.token_command == "verify":
            return _verify(args)
        if args.token_command == "keygen":
            return _keygen(args)
    except (KeyConfigError, InvalidPattern, ValueError) as exc:
        print(f"bookcast token {args.token_command}: {exc}", file=sys.stderr)
        return 2
    except AuthError as exc:  # pragma: no cover - verify handles its own
        print(f"refused ({exc.reason}): {exc.message}", file=sys.stderr)
        return 1
    return 2


def _issue(args: argparse.Namespace) -> int:
    from feed.auth import Algorithm, issue_token, read_rsa_private_key, read_secret

    ttl_s = parse_ttl_s(args.ttl)
    if args.hs256_secret_file is not None:
        algorithm, key = Algorithm.HS256, read_secret(args.hs256_secret_file)
        from feed.auth import VerificationKey

        VerificationKey(args.kid, algorithm, key)  # the same length and form checks as the gateway's
    else:
        algorithm, key = Algorithm.RS256, read_rsa_private_key(args.rs256_private_key_file)
    extra = {k: v for k, v in (("iss", args.iss), ("aud", args.aud)) if v is not None}
    now_s = int(time.time())
    nbf = int(args.not_before) if args.not_before is not None else None
    token = issue_token(sub=args.sub, instruments=args.instruments, now_s=now_s, ttl_s=ttl_s, algorithm=algorithm,
                        key=key, kid=args.kid, not_before_s=nbf, extra_claims=extra)
    expires = datetime.fromtimestamp(now_s + ttl_s, timezone.utc).isoformat(timespec="seconds")
    print(f"token for sub={args.sub!r} alg={algorithm} kid={args.kid!r} expires {expires} "
          f"instruments={args.instruments}", file=sys.stderr)
    print(token)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from feed.auth import AuthError

    verifier = verifier_from_args(args)
    if verifier is None:
        print("bookcast token verify: give the gateway's key options (--auth-jwks, --auth-hs256-secret-file, "
              "--auth-rs256-public-key-file)", file=sys.stderr)
        return 2
    token = sys.stdin.read().strip() if args.token == "-" else args.token
    try:
        auth = verifier.verify(token, time.time_ns())
    except AuthError as exc:
        print(f"refused ({exc.reason}): {exc.message}", file=sys.stderr)
        return 1
    expires = datetime.fromtimestamp(auth.expires_at_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
    print(json.dumps({"sub": auth.subject, "expires": expires, "instruments": [p.text for p in auth.patterns],
                      "token_id": auth.token_id}))
    return 0


def _write_private(path: Path, data: bytes, force: bool) -> None:
    if path.exists() and not force:
        raise ValueError(f"{path} exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _keygen(args: argparse.Namespace) -> int:
    import secrets

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from feed.auth import b64url

    prefix = args.out
    jwks_path = prefix.with_name(prefix.name + ".jwks.json")
    if args.alg == "HS256":
        secret = secrets.token_urlsafe(48).encode()
        _write_private(prefix.with_name(prefix.name + ".secret"), secret + b"\n", args.force)
        jwk = {"kty": "oct", "kid": args.kid, "alg": "HS256", "use": "sig", "k": b64url(secret)}
        _write_private(jwks_path, json.dumps({"keys": [jwk]}, indent=2).encode() + b"\n", args.force)
        written = [prefix.name + ".secret", jwks_path.name]
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        _write_private(prefix.with_name(prefix.name + ".key.pem"), private, args.force)
        pub_path = prefix.with_name(prefix.name + ".pub.pem")
        if pub_path.exists() and not args.force:
            raise ValueError(f"{pub_path} exists (use --force to overwrite)")
        pub_path.write_bytes(public)
        jwk = dict(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), kid=args.kid, alg="RS256",
                   use="sig")
        jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
        written = [prefix.name + ".key.pem", pub_path.name, jwks_path.name]
    print(f"wrote {', '.join(written)} in {prefix.parent or '.'} (kid={args.kid}); give the gateway "
          f"--auth-jwks {jwks_path}", file=sys.stderr)
    return 0
