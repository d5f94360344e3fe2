"""Token auth of PROTOCOL.md section 8: JWTs (HS256, RS256) carrying per-instrument glob patterns.

Two halves:

* **Pure** (no I/O, no clock, no environment): ``TokenVerifier.verify(token, now_ns)`` checks one token
  against a ``KeySet`` with the time passed in and returns an ``Authorization`` or raises ``AuthError``
  with an ``AuthFailure`` reason; ``InstrumentPattern`` is the glob language of the ``instruments`` claim;
  ``token_from_request`` picks the token out of headers and query; ``TokenUsage`` counts connections and
  subscriptions per token for the per-token limits.
* **Loaders** (read files): ``load_key_set`` builds a ``KeySet`` from a JWKS file (RFC 7517) and/or
  single-key files, for ``bookcast gateway`` and ``bookcast token``.

Signatures are checked by PyJWT, always with the one algorithm bound to the key the token's ``kid``
names, so ``alg: none``, an unlisted algorithm and HS/RS confusion (an HS256 token "signed" with an RSA
public key as the HMAC secret) are refused before any signature arithmetic. Time claims are checked here,
against ``now_ns``, not against PyJWT's own clock, so every rule is table-tested by feeding it data.

Rules (RFC 7519 sections 4.1.3-4.1.5, RFC 6750 section 2):

* ``sub``: required, a non-empty string. ``exp``: required, a NumericDate; the token is expired when
  ``now >= exp + leeway``. ``nbf``: optional; not yet valid while ``now < nbf - leeway``. ``iss``/``aud``
  are checked only when the verifier is configured with them.
* ``instruments``: required, a list (at most ``MAX_PATTERNS``) of ``InstrumentPattern`` strings.
* A ``kid`` in the header selects that key; a token without ``kid`` uses the key set's default key (a key
  loaded without a kid), if there is one. Rotation: publish the new key beside the old one, issue tokens
  with the new ``kid``, remove the old key once its tokens have expired.
* The token is read from ``Authorization: Bearer <token>`` (scheme case-insensitive) or the ``token``
  query parameter (browsers cannot set headers on a WebSocket). Both at once, or either twice, is
  ``malformed`` (RFC 6750: a client must use one method).

Nothing here puts a token, a secret or a claim value into an exception message, a log line or a metric
label: ``AuthError.message`` names the rule that failed, never the input.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from feed.errors import LocalError, RemoteError

MAX_TOKEN_BYTES = 8 * 1024  # a longer token is refused unparsed (malformed)
MAX_PATTERNS = 1000  # patterns in one token's ``instruments`` claim
MAX_PATTERN_CHARS = 512  # characters in one pattern
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 section 3.2: a key at least as long as the hash output
MIN_RSA_BITS = 2048  # RFC 7518 section 3.3


class Algorithm(enum.StrEnum):
    """The JWS algorithms bookcast accepts (RFC 7518 section 3)."""

    HS256 = "HS256"
    RS256 = "RS256"


class AuthFailure(enum.StrEnum):
    """Why a token was refused: the ``reason`` label of ``bookcast_gateway_auth_failures_total``."""

    MISSING = "missing"  # no token in header or query
    MALFORMED = "malformed"  # not a compact JWS, too long, two tokens, another auth scheme
    BAD_ALGORITHM = "bad_algorithm"  # alg none or unlisted, or not the algorithm of the kid's key
    UNKNOWN_KID = "unknown_kid"  # the kid names no key (or no kid and no default key)
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_CLAIMS = "bad_claims"  # sub/exp/instruments missing or of the wrong type, a bad pattern, iss/aud


_MESSAGES = {
    AuthFailure.MISSING: "no token: send 'Authorization: Bearer <JWT>' or '?token=<JWT>'",
    AuthFailure.MALFORMED: "token is not a compact JWT",
    AuthFailure.BAD_ALGORITHM: "token algorithm not accepted (HS256 or RS256, the algorithm of its key)",
    AuthFailure.UNKNOWN_KID: "token names no known key",
    AuthFailure.BAD_SIGNATURE: "token signature does not verify",
    AuthFailure.EXPIRED: "token expired",
    AuthFailure.NOT_YET_VALID: "token not valid yet",
    AuthFailure.BAD_CLAIMS: "token claims invalid",
}


class AuthError(RemoteError):
    """A client's token was refused: HTTP 401 at the upgrade or on REST (PROTOCOL.md section 8).

    ``reason`` is an ``AuthFailure``; ``message`` is safe to send to the client and to log (it names the
    rule, never the token or a claim value).
    """

    def __init__(self, reason: AuthFailure, detail: str = "") -> None:
        self.reason = AuthFailure(reason)
        self.message = _MESSAGES[self.reason] + (f": {detail}" if detail else "")
        super().__init__(self.message)


class InvalidPattern(RemoteError, ValueError):
    """An ``instruments`` pattern that does not follow the glob rules of ``InstrumentPattern``."""


class KeyConfigError(LocalError, ValueError):
    """A verification or signing key in the configuration is unusable (the message says which and why)."""


# ---------------------------------------------------------------------------------------------------
# Instrument patterns


@dataclass(frozen=True, slots=True)
class InstrumentPattern:
    """One glob of a token's ``instruments`` claim, matched against the whole instrument id.

    Rules (deliberately smaller than fnmatch, because instrument ids are opaque strings):

    * ``*`` matches any run of characters, including none and including ``:``; ``**`` is the same as ``*``.
    * ``\\*`` is a literal ``*`` and ``\\\\`` a literal backslash; a backslash before anything else, or at
      the end, is an error. Every other character (``?``, ``[``, ``.``) is literal.
    * Matching is case-sensitive and anchored at both ends: ``polymarket:*`` is a venue,
      ``coinbase:BTC-USD`` one instrument, ``*`` everything, ``*-USD`` a suffix.
    * The empty pattern is an error (it could only match the empty id, which is not an instrument).

    Matching runs in time linear in the id (no regular expression, no backtracking).

    Raises (``parse``):
        InvalidPattern: the text breaks a rule above or is longer than ``MAX_PATTERN_CHARS``.
    """

    text: str
    segments: tuple[str, ...]  # literals between the stars: one more than the number of stars

    @classmethod
    def parse(cls, text: str) -> InstrumentPattern:
        if not isinstance(text, str):
            raise InvalidPattern("pattern must be a string")
        if not text:
            raise InvalidPattern("empty pattern")
        if len(text) > MAX_PATTERN_CHARS:
            raise InvalidPattern(f"pattern longer than {MAX_PATTERN_CHARS} characters")
        segments: list[str] = []
        current: list[str] = []
        i = 0
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text) or text[i + 1] not in "*\\":
                    raise InvalidPattern(f"backslash at position {i} must escape '*' or '\\'")
                current.append(text[i + 1])
                i += 2
                continue
            if c == "*":
                segments.append("".join(current))
                current = []
            else:
                current.append(c)
            i += 1
        segments.append("".join(current))
        return cls(text, tuple(segments))

    def matches(self, instrument: str) -> bool:
        segs = self.segments
        if len(segs) == 1:
            return instrument == segs[0]
        head, tail = segs[0], segs[-1]
        if len(instrument) < len(head) + len(tail) or not instrument.startswith(head) or not instrument.endswith(tail):
            return False
        pos, end = len(head), len(instrument) - len(tail)
        for middle in segs[1:-1]:
            if not middle:
                continue
            found = instrument.find(middle, pos, end)
            if found < 0:
                return False
            pos = found + len(middle)
        return True


def escape_instrument(instrument: str) -> str:
    """The pattern matching exactly ``instrument`` (``*`` and ``\\`` escaped)."""
    return instrument.replace("\\", "\\\\").replace("*", "\\*")


# ---------------------------------------------------------------------------------------------------
# Authorization (what a verified token grants)


@dataclass(frozen=True, slots=True)
class Authorization:
    """What a verified token grants one connection or REST request.

    ``allows(instrument)`` is the ``instruments`` claim; ``expires_at_ns`` is when the token stops being
    valid (``exp`` plus the verifier's leeway, ns since the Unix epoch); the session closes with 4001 then.
    ``token_id`` is a stable, non-reversible id of the token (for per-token limits; safe to log), and
    ``subject`` the ``sub`` claim.
    """

    subject: str
    patterns: tuple[InstrumentPattern, ...]
    expires_at_ns: int | None
    token_id: str
    not_before_ns: int | None = None

    def allows(self, instrument: str) -> bool:
        return any(p.matches(instrument) for p in self.patterns)

    def expired(self, now_ns: int) -> bool:
        return self.expires_at_ns is not None and now_ns >= self.expires_at_ns


def token_id_of(token: str) -> str:
    """A short, stable, non-reversible id of a token: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key a token may be signed with: its ``kid`` (None: the default key), its algorithm and the key
    material (the HMAC secret for HS256, an RSA public key for RS256)."""

    kid: str | None
    algorithm: Algorithm
    key: bytes | RSAPublicKey = field(repr=False)

    def __post_init__(self) -> None:
        where = f"key kid={self.kid!r}" if self.kid is not None else "default key"
        if self.algorithm is Algorithm.HS256:
            if not isinstance(self.key, bytes):
                raise KeyConfigError(f"{where}: HS256 needs a secret (bytes)")
            if len(self.key) < MIN_HS256_SECRET_BYTES:
                raise KeyConfigError(f"{where}: HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes")
            if self.key.lstrip().startswith(b"-----BEGIN"):
                raise KeyConfigError(f"{where}: HS256 secret looks like a PEM key (use it as RS256)")
        elif self.algorithm is Algorithm.RS256:
            if not isinstance(self.key, RSAPublicKey):
                raise KeyConfigError(f"{where}: RS256 needs an RSA public key")
            if self.key.key_size < MIN_RSA_BITS:
                raise KeyConfigError(f"{where}: RSA key must be at least {MIN_RSA_BITS} bits")


@dataclass(frozen=True)
class KeySet:
    """The keys a gateway accepts, by ``kid``; at most one default key (no kid).

    Raises:
        KeyConfigError: no key, two keys with one kid, or two default keys.
    """

    keys: tuple[VerificationKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyConfigError("no verification key configured")
        seen: set[str | None] = set()
        for k in self.keys:
            if k.kid in seen:
                raise KeyConfigError(f"two keys with kid={k.kid!r}" if k.kid is not None else "two default keys")
            seen.add(k.kid)

    def find(self, kid: str | None) -> VerificationKey | None:
        for k in self.keys:
            if k.kid == kid:
                return k
        return None


# ---------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class TokenVerifier:
    """Checks tokens against ``keys`` (see the module docstring for every rule).

    ``leeway_s`` widens ``exp``/``nbf`` for clock skew between the issuer and the gateway; ``issuer`` and
    ``audience``, when set, must equal the token's ``iss`` / be in its ``aud``.
    """

    keys: KeySet
    leeway_s: float = 0.0
    issuer: str | None = None
    audience: str | None = None

    def verify(self, token: str | None, now_ns: int) -> Authorization:
        """The ``Authorization`` of a valid ``token`` at ``now_ns`` (ns since the Unix epoch).

        Raises:
            AuthError: with the ``AuthFailure`` reason of the first rule the token breaks.
        """
        if not token:
            raise AuthError(AuthFailure.MISSING)
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2 or not token.isascii():
            raise AuthError(AuthFailure.MALFORMED)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(AuthFailure.MALFORMED) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in Algorithm.__members__:
            raise AuthError(AuthFailure.BAD_ALGORITHM)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(AuthFailure.MALFORMED, "kid must be a string")
        key = self.keys.find(kid)
        if key is None:
            raise AuthError(AuthFailure.UNKNOWN_KID)
        if key.algorithm.value != alg:
            raise AuthError(AuthFailure.BAD_ALGORITHM)
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[key.algorithm.value],
                options={"verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
                         "require": []},
            )
        except jwt.InvalidSignatureError:
            raise AuthError(AuthFailure.BAD_SIGNATURE) from None
        except jwt.PyJWTError:
            raise AuthError(AuthFailure.MALFORMED) from None
        return self._authorization(claims, token, now_ns)

    def _authorization(self, claims: dict[str, Any], token: str, now_ns: int) -> Authorization:
        if not isinstance(claims, dict):
            raise AuthError(AuthFailure.BAD_CLAIMS, "payload must be an object")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError(AuthFailure.BAD_CLAIMS, "'sub' must be a non-empty string")
        leeway_ns = int(self.leeway_s * 1e9)
        if "exp" not in claims:
            raise AuthError(AuthFailure.BAD_CLAIMS, "'exp' is required")
        exp_ns = _numeric_date_ns(claims["exp"], "exp")
        nbf_ns = _numeric_date_ns(claims["nbf"], "nbf") if "nbf" in claims else None
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise AuthError(AuthFailure.BAD_CLAIMS, "'iss' is not the expected issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if self.audience not in auds:
                raise AuthError(AuthFailure.BAD_CLAIMS, "'aud' does not name this service")
        patterns = parse_patterns(claims.get("instruments"))
        if now_ns >= exp_ns + leeway_ns:
            raise AuthError(AuthFailure.EXPIRED)
        if nbf_ns is not None and now_ns < nbf_ns - leeway_ns:
            raise AuthError(AuthFailure.NOT_YET_VALID)
        return Authorization(sub, patterns, exp_ns + leeway_ns, token_id_of(token), nbf_ns)


def parse_patterns(value: object) -> tuple[InstrumentPattern, ...]:
    """The ``instruments`` claim as patterns.

    Raises:
        AuthError: ``bad_claims`` when it is not a list of at most ``MAX_PATTERNS`` valid patterns.
    """
    if not isinstance(value, list):
        raise AuthError(AuthFailure.BAD_CLAIMS, "'instruments' must be a list of patterns")
    if len(value) > MAX_PATTERNS:
        raise AuthError(AuthFailure.BAD_CLAIMS, f"'instruments' holds more than {MAX_PATTERNS} patterns")
    try:
        return tuple(InstrumentPattern.parse(p) for p in value)
    except InvalidPattern as exc:
        raise AuthError(AuthFailure.BAD_CLAIMS, f"'instruments': {exc}") from None


def _numeric_date_ns(value: object, name: str) -> int:
    """A NumericDate (RFC 7519 section 2: seconds since the epoch, may be fractional) in ns."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise AuthError(AuthFailure.BAD_CLAIMS, f"'{name}' must be a number of seconds")
    if isinstance(value, int):
        return value * 1_000_000_000
    return round(value * 1e9)


# ---------------------------------------------------------------------------------------------------
# Where the token travels


def token_from_request(headers: Mapping[str, str] | Any, query: Mapping[str, str] | Any) -> str | None:
    """The token of a request: ``Authorization: Bearer <t>`` or ``?token=<t>`` (RFC 6750 sections 2.1, 2.3).

    ``headers`` and ``query`` are multidicts (aiohttp's ``request.headers`` / ``request.query``) or plain
    mappings. Returns None when neither is present.

    Raises:
        AuthError: ``malformed`` for another scheme (``Basic``), an empty bearer value, a header or query
            parameter given twice, or both a header and a query token.
    """
    header_values = _all(headers, "Authorization")
    query_values = _all(query, "token")
    if len(header_values) > 1 or len(query_values) > 1 or (header_values and query_values):
        raise AuthError(AuthFailure.MALFORMED, "give the token once, in the header or the query")
    if header_values:
        scheme, _, value = header_values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError(AuthFailure.MALFORMED, "the Authorization scheme must be Bearer")
        value = value.strip()
        if not value:
            raise AuthError(AuthFailure.MALFORMED, "empty bearer token")
        return value
    if query_values:
        return query_values[0] or None
    return None


def _all(mapping: Any, key: str) -> list[str]:
    getall = getattr(mapping, "getall", None)
    if getall is not None:
        return list(getall(key, []))
    if key in mapping:
        return [mapping[key]]
    return []


# ---------------------------------------------------------------------------------------------------
# Per-token limits


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """Per-token caps (0 = no cap): over all of a gateway's workers (``feed.gateway.tokenshare``)."""

    max_connections_per_token: int = 0
    max_subscriptions_per_token: int = 0


@dataclass
class TokenUsage:
    """Open connections and subscriptions per ``token_id`` (pure bookkeeping for ``TokenLimits``).

    ``try_connect``/``try_subscribe`` return False (and change nothing) when the cap would be passed; the
    caller answers HTTP 429 / ``forbidden``. Entries disappear when they drop to zero.
    """

    limits: TokenLimits
    connections: dict[str, int] = field(default_factory=dict)
    subscriptions: dict[str, int] = field(default_factory=dict)

    def try_connect(self, token_id: str) -> bool:
        cap = self.limits.max_connections_per_token
        n = self.connections.get(token_id, 0)
        if cap and n >= cap:
            return False
        self.connections[token_id] = n + 1
        return True

    def disconnect(self, token_id: str, subscriptions: int = 0) -> None:
        """One connection of ``token_id`` closed, holding ``subscriptions``."""
        _decrement(self.connections, token_id, 1)
        _decrement(self.subscriptions, token_id, subscriptions)

    def try_subscribe(self, token_id: str, new: int) -> bool:
        cap = self.limits.max_subscriptions_per_token
        n = self.subscriptions.get(token_id, 0)
        if cap and n + new > cap:
            return False
        if new:
            self.subscriptions[token_id] = n + new
        return True

    def unsubscribe(self, token_id: str, n: int) -> None:
        _decrement(self.subscriptions, token_id, n)


def _decrement(counts: dict[str, int], key: str, n: int) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


# ---------------------------------------------------------------------------------------------------
# Loaders (file I/O) and signing


def _split_kid(spec: str) -> tuple[str | None, Path]:
    """``KID=PATH`` or ``PATH`` (the default key)."""
    kid, sep, path = spec.partition("=")
    if sep and kid and "/" not in kid:
        return kid, Path(path)
    return None, Path(spec)


def read_secret(path: Path) -> bytes:
    """An HS256 secret file: its bytes, one trailing newline stripped.

    Raises:
        KeyConfigError: the file cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    return data[:-1] if data.endswith(b"\n") else data


def read_rsa_public_key(path: Path) -> RSAPublicKey:
    """An RSA public key from a PEM file (``PUBLIC KEY``; a private key file yields its public half).

    Raises:
        KeyConfigError: unreadable, not PEM, or not RSA.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise KeyConfigError(f"{path}: not a PEM RSA key") from None
    if not isinstance(key, RSAPublicKey):
        raise KeyConfigError(f"{path}: not an RSA key")
    return key


def read_rsa_private_key(path: Path) -> RSAPrivateKey:
    """An RSA private key from an unencrypted PEM file.

    Raises:
        KeyConfigError: unreadable, not PEM, encrypted, or not RSA.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise KeyConfigError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise KeyConfigError(f"{path}: not an RSA key")
    return key


def keys_from_jwks(doc: Mapping[str, Any], where: str = "JWKS") -> list[VerificationKey]:
    """Verification keys of a JWK Set (RFC 7517 section 5): ``oct`` keys for HS256, ``RSA`` for RS256.

    Every key needs a ``kid``; ``alg``, when present, must be HS256 or RS256 and match the key type.
    Private RSA members are ignored (only the public key is kept).

    Raises:
        KeyConfigError: not a key set, a key without kid, another algorithm or key type.
    """
    entries = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise KeyConfigError(f"{where}: must be an object with a 'keys' list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
            raise KeyConfigError(f"{where}: key {i} needs a 'kid'")
        kid, kty, alg = entry["kid"], entry.get("kty"), entry.get("alg")
        expected = {"oct": Algorithm.HS256, "RSA": Algorithm.RS256}.get(kty)
        if expected is None:
            raise KeyConfigError(f"{where}: key kid={kid!r}: kty must be 'oct' (HS256) or 'RSA' (RS256)")
        if alg is not None and alg != expected.value:
            raise KeyConfigError(f"{where}: key kid={kid!r}: alg must be {expected.value} for kty {kty}")
        try:
            jwk = jwt.PyJWK(dict(entry, alg=expected.value))
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise KeyConfigError(f"{where}: key kid={kid!r}: {type(exc).__name__}") from None
        material = jwk.key
        if isinstance(material, RSAPrivateKey):
            material = material.public_key()
        out.append(VerificationKey(kid, expected, material))
    return out


def load_key_set(*, jwks_files: Iterable[Path] = (), hs256_secret_files: Iterable[str] = (),
                 rs256_public_key_files: Iterable[str] = ()) -> KeySet:
    """A ``KeySet`` from files. Single-key specs are ``KID=PATH`` or ``PATH`` (the default key).

    Raises:
        KeyConfigError: a file is missing or unusable, or the keys clash (see ``KeySet``).
    """
    keys: list[VerificationKey] = []
    for path in jwks_files:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise KeyConfigError(f"cannot read JWKS file {path}: {exc.strerror}") from None
        except ValueError:
            raise KeyConfigError(f"JWKS file {path} is not JSON") from None
        keys += keys_from_jwks(doc, str(path))
    for spec in hs256_secret_files:
        kid, path = _split_kid(spec)
        keys.append(VerificationKey(kid, Algorithm.HS256, read_secret(path)))
    for spec in rs256_public_key_files:
        kid, path = _split_kid(spec)
        keys.append(VerificationKey(kid, Algorithm.RS256, read_rsa_public_key(path)))
    return KeySet(tuple(keys))


def issue_token(*, sub: str, instruments: Iterable[str], now_s: int, ttl_s: int, algorithm: Algorithm,
                key: bytes | RSAPrivateKey, kid: str | None = None, not_before_s: int | None = None,
                extra_claims: Mapping[str, Any] | None = None) -> str:
    """A signed token for ``sub`` valid from ``not_before_s`` (default: no nbf) until ``now_s + ttl_s``.

    Raises:
        InvalidPattern: a pattern breaks the ``InstrumentPattern`` rules (checked before signing).
        ValueError: ``ttl_s`` not positive, or an empty ``sub``.
    """
    patterns = list(instruments)
    for p in patterns:
        InstrumentPattern.parse(p)
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    if not sub:
        raise ValueError("sub must not be empty")
    claims: dict[str, Any] = dict(extra_claims or {})
    claims.update({"sub": sub, "iat": now_s, "exp": now_s + ttl_s, "instruments": patterns})
    if not_before_s is not None:
        claims["nbf"] = not_before_s
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, key, algorithm=algorithm.value, headers=headers)


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2), e.g. for a JWKS ``k``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


__all__ = [
    "Algorithm", "AuthError", "AuthFailure", "Authorization", "InstrumentPattern", "InvalidPattern",
    "KeyConfigError", "KeySet", "TokenLimits", "TokenUsage", "TokenVerifier", "VerificationKey",
    "escape_instrument", "issue_token", "keys_from_jwks", "load_key_set", "parse_patterns", "read_rsa_private_key",
    "read_rsa_public_key", "read_secret", "token_from_request", "token_id_of",
]
