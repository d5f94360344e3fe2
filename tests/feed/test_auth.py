"""Token auth (feed.auth): every way a token can be refused, glob patterns, where the token travels, keys."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict

from feed.auth import (
    MAX_PATTERNS,
    MAX_TOKEN_BYTES,
    Algorithm,
    AuthError,
    AuthFailure,
    InstrumentPattern,
    InvalidPattern,
    KeyConfigError,
    KeySet,
    TokenLimits,
    TokenUsage,
    TokenVerifier,
    VerificationKey,
    escape_instrument,
    issue_token,
    keys_from_jwks,
    load_key_set,
    token_from_request,
)

NOW_S = 1_765_450_800
NOW_NS = NOW_S * 1_000_000_000
HS_SECRET = b"s3cret-s3cret-s3cret-s3cret-0001"
HS_SECRET_2 = b"another-secret-another-secret-02"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

KEYS = KeySet((
    VerificationKey("hs-1", Algorithm.HS256, HS_SECRET),
    VerificationKey("rs-1", Algorithm.RS256, RSA_KEY.public_key()),
))
VERIFIER = TokenVerifier(KEYS)


def claims(**over):
    base = {"sub": "alice", "exp": NOW_S + 3600, "instruments": ["polymarket:*"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def hs(payload=None, kid="hs-1", secret=HS_SECRET, alg="HS256") -> str:
    return jwt.encode(claims() if payload is None else payload, secret, algorithm=alg,
                      headers={"kid": kid} if kid is not None else None)


def rs(payload=None, kid="rs-1", key=RSA_KEY) -> str:
    return jwt.encode(claims() if payload is None else payload, key, algorithm="RS256",
                      headers={"kid": kid} if kid is not None else None)


def _b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def handmade(header: dict, payload, secret: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to sign some of the attacks)."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    sig = _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()) if secret is not None else ""
    return f"{signing_input}.{sig}"


def tampered() -> str:
    good = hs()
    head, _, sig = good.split(".")
    return f"{head}.{_b64(claims(instruments=['*']))}.{sig}"


REFUSED = [
    ("no token", None, AuthFailure.MISSING),
    ("empty token", "", AuthFailure.MISSING),
    ("not a JWT", "hello", AuthFailure.MALFORMED),
    ("three garbage parts", "a.b.c", AuthFailure.MALFORMED),
    ("non-ASCII", "é.é.é", AuthFailure.MALFORMED),
    ("too long", "a." + "b" * MAX_TOKEN_BYTES + ".c", AuthFailure.MALFORMED),
    ("payload not an object", handmade({"alg": "HS256", "kid": "hs-1"}, ["a"], HS_SECRET), AuthFailure.MALFORMED),
    ("kid not a string", handmade({"alg": "HS256", "kid": 7}, claims(), HS_SECRET), AuthFailure.MALFORMED),
    ("alg none, no signature", handmade({"alg": "none", "kid": "hs-1"}, claims(), None), AuthFailure.BAD_ALGORITHM),
    ("alg None (case)", handmade({"alg": "None", "kid": "hs-1"}, claims(), None), AuthFailure.BAD_ALGORITHM),
    ("alg missing", handmade({"kid": "hs-1"}, claims(), HS_SECRET), AuthFailure.BAD_ALGORITHM),
    ("alg HS512", hs(alg="HS512", secret=HS_SECRET * 2), AuthFailure.BAD_ALGORITHM),
    ("HS/RS confusion: HS256 keyed with the RSA public key PEM",
     handmade({"alg": "HS256", "kid": "rs-1"}, claims(), RSA_PUBLIC_PEM), AuthFailure.BAD_ALGORITHM),
    ("RS256 token naming the HS key", rs(kid="hs-1"), AuthFailure.BAD_ALGORITHM),
    ("unknown kid", hs(kid="hs-9"), AuthFailure.UNKNOWN_KID),
    ("no kid, no default key", hs(kid=None), AuthFailure.UNKNOWN_KID),
    ("HS256 signed with another secret", hs(secret=HS_SECRET_2), AuthFailure.BAD_SIGNATURE),
    ("payload swapped under a valid signature", tampered(), AuthFailure.BAD_SIGNATURE),
    ("RS256 signed with another key", rs(key=RSA_OTHER), AuthFailure.BAD_SIGNATURE),
    ("signature stripped", hs().rsplit(".", 1)[0] + ".", AuthFailure.BAD_SIGNATURE),
    ("expired", hs(claims(exp=NOW_S - 1)), AuthFailure.EXPIRED),
    ("expires right now (exp is exclusive)", hs(claims(exp=NOW_S)), AuthFailure.EXPIRED),
    ("not yet valid", hs(claims(nbf=NOW_S + 10)), AuthFailure.NOT_YET_VALID),
    ("not yet valid by a fraction", hs(claims(nbf=NOW_S + 0.5)), AuthFailure.NOT_YET_VALID),
    ("no exp", hs(claims(exp=_DROP)), AuthFailure.BAD_CLAIMS),
    ("exp a string", hs(claims(exp=str(NOW_S + 60))), AuthFailure.BAD_CLAIMS),
    ("exp a boolean", hs(claims(exp=True)), AuthFailure.BAD_CLAIMS),
    ("nbf a string", hs(claims(nbf="soon")), AuthFailure.BAD_CLAIMS),
    ("no sub", hs(claims(sub=_DROP)), AuthFailure.BAD_CLAIMS),
    ("empty sub", hs(claims(sub="")), AuthFailure.BAD_CLAIMS),
    ("sub a number", hs(claims(sub=7)), AuthFailure.BAD_CLAIMS),
    ("no instruments", hs(claims(instruments=_DROP)), AuthFailure.BAD_CLAIMS),
    ("instruments a string", hs(claims(instruments="polymarket:*")), AuthFailure.BAD_CLAIMS),
    ("instruments item not a string", hs(claims(instruments=["a:*", 3])), AuthFailure.BAD_CLAIMS),
    ("empty pattern", hs(claims(instruments=[""])), AuthFailure.BAD_CLAIMS),
    ("bad escape in a pattern", hs(claims(instruments=["a:\\b"])), AuthFailure.BAD_CLAIMS),
    ("too many patterns", hs(claims(instruments=["a:b"] * (MAX_PATTERNS + 1))), AuthFailure.BAD_CLAIMS),
]


@pytest.mark.parametrize("name,token,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_tokens_name_their_reason_and_never_echo_the_token(name, token, reason):
    with pytest.raises(AuthError) as info:
        VERIFIER.verify(token, NOW_NS)
    assert info.value.reason is reason, name
    text = str(info.value)
    if token:
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in text
    assert HS_SECRET.decode() not in text and "alice" not in text


ACCEPTED = [
    ("HS256 with kid", hs(), "alice"),
    ("RS256 with kid", rs(), "alice"),
    ("nbf equal to now", hs(claims(nbf=NOW_S)), "alice"),
    ("expires a second from now", hs(claims(exp=NOW_S + 1)), "alice"),
    ("fractional exp", hs(claims(exp=NOW_S + 0.25)), "alice"),
    ("empty pattern list (grants nothing)", hs(claims(instruments=[])), "alice"),
    ("unknown extra claims ignored", hs(claims(role="ops", iat=NOW_S)), "alice"),
]


@pytest.mark.parametrize("name,token,sub", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_tokens(name, token, sub):
    auth = VERIFIER.verify(token, NOW_NS)
    assert auth.subject == sub
    assert auth.expires_at_ns > NOW_NS
    assert len(auth.token_id) == 16 and auth.token_id not in token


def test_authorization_carries_exp_patterns_and_expiry():
    auth = VERIFIER.verify(hs(claims(exp=NOW_S + 60, instruments=["polymarket:*", "coinbase:BTC-USD"])), NOW_NS)
    assert auth.expires_at_ns == (NOW_S + 60) * 1_000_000_000
    assert auth.allows("polymarket:123") and auth.allows("coinbase:BTC-USD")
    assert not auth.allows("coinbase:ETH-USD")
    assert not auth.expired(auth.expires_at_ns - 1) and auth.expired(auth.expires_at_ns)


def test_default_key_verifies_tokens_without_kid_and_only_those():
    verifier = TokenVerifier(KeySet((VerificationKey(None, Algorithm.RS256, RSA_KEY.public_key()),)))
    assert verifier.verify(rs(kid=None), NOW_NS).subject == "alice"
    with pytest.raises(AuthError) as info:
        verifier.verify(rs(kid="rs-1"), NOW_NS)
    assert info.value.reason is AuthFailure.UNKNOWN_KID
    with pytest.raises(AuthError) as info:  # HS/RS confusion against a default RSA key
        verifier.verify(handmade({"alg": "HS256"}, claims(), RSA_PUBLIC_PEM), NOW_NS)
    assert info.value.reason is AuthFailure.BAD_ALGORITHM


def test_leeway_widens_exp_and_nbf_both_ways():
    verifier = TokenVerifier(KEYS, leeway_s=5)
    assert verifier.verify(hs(claims(exp=NOW_S - 4)), NOW_NS)
    assert verifier.verify(hs(claims(nbf=NOW_S + 4)), NOW_NS)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(hs(claims(exp=NOW_S - 5)), NOW_NS)


def test_issuer_and_audience_checked_only_when_configured():
    verifier = TokenVerifier(KEYS, issuer="bookcast-ops", audience="bookcast-gateway")
    ok = hs(claims(iss="bookcast-ops", aud=["other", "bookcast-gateway"]))
    assert verifier.verify(ok, NOW_NS).subject == "alice"
    for bad in (claims(iss="someone", aud="bookcast-gateway"), claims(iss="bookcast-ops"),
                claims(iss="bookcast-ops", aud="other")):
        with pytest.raises(AuthError) as info:
            verifier.verify(hs(bad), NOW_NS)
        assert info.value.reason is AuthFailure.BAD_CLAIMS
    assert VERIFIER.verify(hs(claims(iss="anyone", aud="x")), NOW_NS)


def test_rotation_by_kid():
    old = VerificationKey("2026-11", Algorithm.HS256, HS_SECRET)
    new = VerificationKey("2026-12", Algorithm.HS256, HS_SECRET_2)
    old_token, new_token = hs(kid="2026-11"), hs(kid="2026-12", secret=HS_SECRET_2)
    both = TokenVerifier(KeySet((old, new)))
    assert both.verify(old_token, NOW_NS) and both.verify(new_token, NOW_NS)
    retired = TokenVerifier(KeySet((new,)))
    assert retired.verify(new_token, NOW_NS)
    with pytest.raises(AuthError) as info:
        retired.verify(old_token, NOW_NS)
    assert info.value.reason is AuthFailure.UNKNOWN_KID
    with pytest.raises(AuthError) as info:  # the old kid re-used with the new secret: signature fails
        both.verify(hs(kid="2026-11", secret=HS_SECRET_2), NOW_NS)
    assert info.value.reason is AuthFailure.BAD_SIGNATURE


# -- patterns --------------------------------------------------------------------------------------

PATTERNS = [
    ("*", "polymarket:123", True),
    ("*", "coinbase:BTC-USD", True),
    ("polymarket:*", "polymarket:btc-1h-1765450800-up", True),
    ("polymarket:*", "polymarket:", True),
    ("polymarket:*", "coinbase:BTC-USD", False),
    ("polymarket:*", "polymarketx:1", False),
    ("polymarket:*", "xpolymarket:1", False),
    ("coinbase:BTC-USD", "coinbase:BTC-USD", True),
    ("coinbase:BTC-USD", "coinbase:BTC-USDT", False),
    ("coinbase:BTC-USD", "coinbase:btc-usd", False),
    ("coinbase:BTC-USD", "xcoinbase:BTC-USD", False),
    ("*-USD", "coinbase:BTC-USD", True),
    ("*-USD", "coinbase:BTC-USDT", False),
    ("coinbase:*-GBP", "coinbase:BAND-GBP", True),
    ("a*b*c", "abc", True),
    ("a*b*c", "aXbYc", True),
    ("a*b*c", "acb", False),
    ("a*a", "a", False),
    ("a*a", "aa", True),
    ("a**b", "ab", True),
    ("*:*", "nocolon", False),
    ("kalshi:A\\*B", "kalshi:A*B", True),
    ("kalshi:A\\*B", "kalshi:AxB", False),
    ("x\\\\*", "x\\anything", True),
    ("x\\\\*", "xanything", False),
    ("coinbase:BTC?", "coinbase:BTC?", True),
    ("coinbase:BTC?", "coinbase:BTCX", False),  # ? is literal, unlike fnmatch
    ("kalshi:[ab]", "kalshi:a", False),  # [] is literal, unlike fnmatch
    ("kalshi:[ab]", "kalshi:[ab]", True),
    ("x.y", "xzy", False),  # . is literal
]


@pytest.mark.parametrize("pattern,instrument,expected", PATTERNS)
def test_pattern_table(pattern, instrument, expected):
    assert InstrumentPattern.parse(pattern).matches(instrument) is expected


@pytest.mark.parametrize("pattern", ["", "a\\b", "trailing\\", "\\", "x" * 513])
def test_invalid_patterns(pattern):
    with pytest.raises(InvalidPattern):
        InstrumentPattern.parse(pattern)


def _reference_match(pattern: InstrumentPattern, s: str) -> bool:
    return re.fullmatch(".*".join(re.escape(seg) for seg in pattern.segments), s, re.DOTALL) is not None


_ALPHABET = st.sampled_from(list("ab:*\\-?"))


@given(st.text(_ALPHABET, min_size=1, max_size=12), st.text(st.sampled_from(list("ab:*\\-?")), max_size=12))
def test_pattern_matching_agrees_with_a_regex_reference(pattern_text, instrument):
    try:
        pattern = InstrumentPattern.parse(pattern_text)
    except InvalidPattern:
        return
    assert pattern.matches(instrument) == _reference_match(pattern, instrument)


@given(st.text(min_size=1, max_size=30), st.text(max_size=30))
def test_escaped_instrument_matches_only_itself(instrument, other):
    pattern = InstrumentPattern.parse(escape_instrument(instrument))
    assert pattern.matches(instrument)
    assert pattern.matches(other) is (other == instrument)


# -- where the token travels -----------------------------------------------------------------------

FROM_REQUEST = [
    ({}, {}, None),
    ({"Authorization": "Bearer abc.def.ghi"}, {}, "abc.def.ghi"),
    ({"authorization": "bearer abc.def.ghi"}, {}, "abc.def.ghi"),
    ({"Authorization": "  BEARER   abc.def.ghi  "}, {}, "abc.def.ghi"),
    ({}, {"token": "abc.def.ghi"}, "abc.def.ghi"),
    ({}, {"token": ""}, None),
    ({}, {"other": "x"}, None),
]


@pytest.mark.parametrize("headers,query,expected", FROM_REQUEST)
def test_token_from_header_or_query(headers, query, expected):
    assert token_from_request(CIMultiDict(headers), MultiDict(query)) == expected


@pytest.mark.parametrize("headers,query", [
    ([("Authorization", "Basic dXNlcjpwdw==")], []),
    ([("Authorization", "Bearer")], []),
    ([("Authorization", "Bearer    ")], []),
    ([("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")], []),
    ([], [("token", "a.b.c"), ("token", "d.e.f")]),
    ([("Authorization", "Bearer a.b.c")], [("token", "a.b.c")]),
])
def test_ambiguous_or_foreign_credentials_are_malformed(headers, query):
    with pytest.raises(AuthError) as info:
        token_from_request(CIMultiDict(headers), MultiDict(query))
    assert info.value.reason is AuthFailure.MALFORMED
    assert "a.b.c" not in str(info.value) and "dXNlcjpwdw" not in str(info.value)


def test_token_from_plain_mappings():
    assert token_from_request({"Authorization": "Bearer t.o.k"}, {}) == "t.o.k"
    assert token_from_request({}, {"token": "t.o.k"}) == "t.o.k"


# -- per-token limits ------------------------------------------------------------------------------

def test_token_usage_caps_connections_and_subscriptions():
    usage = TokenUsage(TokenLimits(max_connections_per_token=2, max_subscriptions_per_token=5))
    assert usage.try_connect("t1") and usage.try_connect("t1")
    assert not usage.try_connect("t1")
    assert usage.try_connect("t2")  # another token has its own count
    assert usage.try_subscribe("t1", 3) and usage.try_subscribe("t1", 2)
    assert not usage.try_subscribe("t1", 1)
    assert usage.subscriptions["t1"] == 5  # a refused subscribe changes nothing
    usage.unsubscribe("t1", 2)
    assert usage.try_subscribe("t1", 2)
    usage.disconnect("t1", subscriptions=5)
    assert usage.try_connect("t1")
    usage.disconnect("t1")
    usage.disconnect("t1")
    assert "t1" not in usage.connections and "t1" not in usage.subscriptions
    unlimited = TokenUsage(TokenLimits())
    assert all(unlimited.try_connect("t") for _ in range(1000)) and unlimited.try_subscribe("t", 10**6)


# -- keys ------------------------------------------------------------------------------------------

def test_key_files_and_jwks(tmp_path):
    secret = tmp_path / "hs.secret"
    secret.write_bytes(HS_SECRET + b"\n")
    pem = tmp_path / "rs.pem"
    pem.write_bytes(RSA_PUBLIC_PEM)
    jwks = tmp_path / "keys.json"
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_OTHER.public_key()))
    jwks.write_text(json.dumps({"keys": [
        {"kty": "oct", "kid": "j-hs", "k": base64.urlsafe_b64encode(HS_SECRET_2).rstrip(b"=").decode()},
        dict(rsa_jwk, kid="j-rs", alg="RS256", use="sig"),
    ]}))
    keys = load_key_set(jwks_files=[jwks], hs256_secret_files=[f"f-hs={secret}"], rs256_public_key_files=[str(pem)])
    verifier = TokenVerifier(keys)
    assert verifier.verify(hs(kid="f-hs"), NOW_NS)
    assert verifier.verify(rs(kid=None), NOW_NS)
    assert verifier.verify(hs(kid="j-hs", secret=HS_SECRET_2), NOW_NS)
    assert verifier.verify(rs(kid="j-rs", key=RSA_OTHER), NOW_NS)


def test_private_key_file_yields_its_public_half(tmp_path):
    pem = tmp_path / "private.pem"
    pem.write_bytes(RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    verifier = TokenVerifier(load_key_set(rs256_public_key_files=[f"k={pem}"]))
    assert verifier.verify(rs(kid="k"), NOW_NS)


@pytest.mark.parametrize("build,match", [
    (lambda: VerificationKey("k", Algorithm.HS256, b"short"), "at least 32 bytes"),
    (lambda: VerificationKey("k", Algorithm.HS256, RSA_PUBLIC_PEM), "PEM"),
    (lambda: VerificationKey("k", Algorithm.RS256, HS_SECRET), "RSA public key"),
    (lambda: VerificationKey("k", Algorithm.RS256,
                             rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()), "2048"),
    (lambda: KeySet(()), "no verification key"),
    (lambda: KeySet((VerificationKey("k", Algorithm.HS256, HS_SECRET),
                     VerificationKey("k", Algorithm.HS256, HS_SECRET_2))), "two keys"),
    (lambda: KeySet((VerificationKey(None, Algorithm.HS256, HS_SECRET),
                     VerificationKey(None, Algorithm.HS256, HS_SECRET_2))), "two default keys"),
    (lambda: keys_from_jwks({"keys": [{"kty": "oct", "k": "AAAA"}]}), "needs a 'kid'"),
    (lambda: keys_from_jwks({"keys": [{"kty": "EC", "kid": "e"}]}), "kty must be"),
    (lambda: keys_from_jwks({"keys": [{"kty": "oct", "kid": "o", "alg": "HS512", "k": "AAAA"}]}), "alg must be"),
    (lambda: keys_from_jwks([]), "'keys' list"),
    (lambda: load_key_set(hs256_secret_files=["/nonexistent/secret"]), "cannot read"),
])
def test_unusable_key_configuration_is_refused_with_a_reason(build, match):
    with pytest.raises(KeyConfigError, match=match):
        build()


def test_issue_token_round_trip_and_refuses_bad_patterns():
    token = issue_token(sub="ops-desk", instruments=["polymarket:*", "coinbase:BTC-USD"], now_s=NOW_S, ttl_s=3600,
                        algorithm=Algorithm.RS256, key=RSA_KEY, kid="rs-1")
    auth = VERIFIER.verify(token, NOW_NS)
    assert auth.subject == "ops-desk" and auth.allows("polymarket:x") and not auth.allows("coinbase:ETH-USD")
    assert auth.expires_at_ns == (NOW_S + 3600) * 10**9
    with pytest.raises(AuthError) as info:
        VERIFIER.verify(token, (NOW_S + 3600) * 10**9)
    assert info.value.reason is AuthFailure.EXPIRED
    with pytest.raises(InvalidPattern):
        issue_token(sub="x", instruments=["a\\b"], now_s=NOW_S, ttl_s=60, algorithm=Algorithm.HS256, key=HS_SECRET)
