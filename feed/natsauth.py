"""Who may do what on NATS: users per role, their subject permissions, and client credentials.

The integrity of every book rests on one rule: only an ingest publishes market data. A gateway may
subscribe to deltas, trades and the instrument directory, request snapshots and ask for announcements,
and nothing else, so a compromised or buggy gateway (or anyone else on the network) cannot forge or
replay a delta; nats-server refuses it with a permissions violation before any subscriber sees it.

``ROLE_PERMISSIONS`` is the one table of those rules (subjects as in ``feed.subjects``); add a subject
here when a role needs a new one. ``authorization_block`` renders nats-server's ``authorization``
config from ``NatsUser``s and ``NatsNkeyUser``s (pure); ``NatsCredentials`` is the client side (``nats.connect(**kwargs)``),
with the password read from a file so it never appears in argv, ``ps`` or logs.

Permissions follow https://docs.nats.io/running-a-nats-service/configuration/securing_nats/authorization:
``allow`` lists per direction, and ``allow_responses`` lets the ingest answer snapshot requests on their
reply subjects without a publish right on ``_INBOX.>``.
"""
from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from feed.natscreds import NatsAuthError, NatsCredentials, nkey_public_key  # noqa: F401 - re-exported: their home for callers
from feed.subjects import ANNOUNCE_REQUEST, PREFIX

INBOX = "_INBOX.>"  # nats-py's request/reply inboxes (its default inbox prefix)


class NatsRole(enum.StrEnum):
    """What a NATS user is for."""

    INGEST = "ingest"  # publishes deltas, trades and directories; answers snapshot requests
    GATEWAY = "gateway"  # reads market data, requests snapshots and announcements; publishes no data
    ADMIN = "admin"  # operators' and tests' tools: no restriction


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a role may publish to and subscribe to (nats-server wildcards)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


ROLE_PERMISSIONS: dict[NatsRole, Permissions | None] = {
    NatsRole.INGEST: Permissions(
        publish=(f"{PREFIX}.>",),
        subscribe=(f"{PREFIX}.snap.*.*", ANNOUNCE_REQUEST, INBOX),
        allow_responses=True,
    ),
    NatsRole.GATEWAY: Permissions(
        publish=(f"{PREFIX}.snap.*.*", ANNOUNCE_REQUEST),  # requests (their replies come to its inbox)
        subscribe=(f"{PREFIX}.*.*", f"{PREFIX}.trade.*.*", f"{PREFIX}.meta.instruments.*", INBOX),
    ),
    NatsRole.ADMIN: None,
}


@dataclass(frozen=True)
class NatsUser:
    """One user of nats-server's config: name, password and role (its permissions)."""

    name: str
    password: str = field(repr=False)
    role: NatsRole

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise NatsAuthError(f"NATS user name must be non-empty without spaces, got {self.name!r}")
        if len(self.password) < 12:
            raise NatsAuthError(f"NATS password of user {self.name!r} must be at least 12 characters")
        if any(c in self.password for c in "\r\n\x00"):
            raise NatsAuthError(f"NATS password of user {self.name!r} must be one line")

    @classmethod
    def generate(cls, role: NatsRole, name: str | None = None) -> NatsUser:
        """A user for ``role`` with a fresh random password (256 bits, URL-safe)."""
        return cls(name or role.value, secrets.token_urlsafe(32), role)


@dataclass(frozen=True)
class NatsNkeyUser:
    """A user of nats-server's config that logs in with an nkey: the server holds only the public key
    (``U...``); the client signs the server's nonce with the seed (``SU...``), which never leaves it.
    ``name`` only names the seed file and log lines; nats-server knows the user by its key."""

    name: str
    seed: bytes = field(repr=False)
    role: NatsRole

    @property
    def public_key(self) -> str:
        import nkeys

        pair = nkeys.from_seed(bytearray(self.seed))
        try:
            return pair.public_key.decode()
        finally:
            pair.wipe()

    @classmethod
    def generate(cls, role: NatsRole, name: str | None = None) -> NatsNkeyUser:
        """A user for ``role`` with a fresh Ed25519 key pair (the seed as ``nk -gen user`` writes it)."""
        import nkeys

        return cls(name or role.value, bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)),
                   role)


def authorization_block(users: list[NatsUser | NatsNkeyUser], auth_timeout_s: float = 2.0) -> str:
    """nats-server's ``authorization { users = [...] }`` for ``users`` (strings JSON-quoted): password users
    as ``{user, password}``, nkey users as ``{nkey}``, each with its role's permissions. No anonymous
    user: a connection without valid credentials is refused (``Authorization Violation``)."""
    lines = ["authorization {", f"  timeout: {auth_timeout_s}", "  users = ["]
    for user in users:
        if isinstance(user, NatsNkeyUser):
            entry = f"    {{nkey: {json.dumps(user.public_key)}"
        else:
            entry = f"    {{user: {json.dumps(user.name)}, password: {json.dumps(user.password)}"
        perms = ROLE_PERMISSIONS[user.role]
        if perms is not None:
            pub = ", ".join(json.dumps(s) for s in perms.publish)
            sub = ", ".join(json.dumps(s) for s in perms.subscribe)
            entry += f", permissions: {{publish: {{allow: [{pub}]}}, subscribe: {{allow: [{sub}]}}"
            if perms.allow_responses:
                entry += ", allow_responses: true"
            entry += "}"
        lines.append(entry + "}")
    lines += ["  ]", "}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Client side


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--nats-user`` and ``--nats-password-file``, or ``--nats-nkey-seed-file`` (for ``bookcast replay``
    and ``bookcast gateway``)."""
    p.add_argument("--nats-user", default=os.environ.get("BOOKCAST_NATS_USER"),
                   help="NATS user name (default $BOOKCAST_NATS_USER; unset = anonymous)")
    p.add_argument("--nats-password-file", type=Path, default=os.environ.get("BOOKCAST_NATS_PASSWORD_FILE"),
                   help="file holding that user's NATS password (default $BOOKCAST_NATS_PASSWORD_FILE)")
    p.add_argument("--nats-nkey-seed-file", type=Path, default=os.environ.get("BOOKCAST_NATS_NKEY_SEED_FILE"),
                   help="file holding an nkey user seed (SU...), instead of a user and password "
                        "(default $BOOKCAST_NATS_NKEY_SEED_FILE)")


def credentials_from_args(args: argparse.Namespace) -> NatsCredentials:
    return NatsCredentials.from_files(getattr(args, "nats_user", None), getattr(args, "nats_password_file", None),
                                      getattr(args, "nats_nkey_seed_file", None))


def write_password_file(directory: Path | str, user: NatsUser) -> Path:
    """Write ``user``'s password to ``<directory>/<name>.nats-password`` (mode 0600) and return the path."""
    path = Path(directory) / f"{user.name}.nats-password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(user.password + "\n")
    return path


def write_nkey_seed_file(directory: Path | str, user: NatsNkeyUser) -> Path:
    """Write ``user``'s seed to ``<directory>/<name>.nk`` (mode 0600) and return the path."""
    path = Path(directory) / f"{user.name}.nk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(user.seed + b"\n")
    return path


def redacted_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


async def connect(servers: str | list[str], credentials: NatsCredentials, *,
                  error_cb: Callable[[Exception], Awaitable[None]] | None = None, **kwargs: Any):
    """``nats.connect`` with ``credentials``, failing fast when the server refuses them.

    nats-py retries a refused login for ever when reconnects are unlimited, so a wrong password would
    look like a hang with a warning per attempt. Here the first ``Authorization Violation`` before the
    connection is up cancels the attempt and raises. Other errors go to ``error_cb`` as usual.

    Raises:
        NatsAuthError: the server refused the login (the message names the user, never the password).
    """
    import nats

    nc = nats.NATS()
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if not nc.is_connected and "authorization violation" in str(exc).lower():
            refused.set()
            return
        if error_cb is not None:
            await error_cb(exc)

    attempt = asyncio.ensure_future(nc.connect(servers, error_cb=on_error, **credentials.connect_kwargs(), **kwargs))
    waiter = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({attempt, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if attempt.done():
        attempt.result()
        return nc
    attempt.cancel()
    await asyncio.gather(attempt, return_exceptions=True)
    try:
        await nc.close()
    except Exception:  # noqa: BLE001 - best effort: the attempt never got a connection
        pass
    hint = "--nats-nkey-seed-file" if credentials.nkey else "--nats-user and --nats-password-file"
    raise NatsAuthError(f"NATS refused the login of {credentials.describe()} (Authorization Violation): "
                        f"check {hint}")
