"""A client's NATS login as plain data (``NatsCredentials``), apart from ``feed.natsauth`` (which talks to
NATS), so the pure gateway config (``feed.gateway.config``) can hold one without importing a NATS client.
``feed.natsauth`` re-exports both names; import them from there.

Two logins (https://docs.nats.io/running-a-nats-service/configuration/securing_nats/auth_intro):
user + password (read from a file), or an nkey (an Ed25519 key pair: the client signs the server's nonce
with the seed in its seed file; the server's config holds only the public key ``U...``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feed.errors import LocalError


class NatsAuthError(LocalError, ValueError):
    """Unusable NATS credentials in the configuration (the message says which, never the password)."""


@dataclass(frozen=True)
class NatsCredentials:
    """A client's NATS login. ``connect_kwargs()`` goes into ``nats.connect``; empty when anonymous."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None  # nats-py reads the seed from it at each (re)connect
    nkey: str | None = None  # the seed's public key (``U...``), for messages

    def connect_kwargs(self) -> dict[str, Any]:
        if self.nkey_seed_file is not None:
            return {"nkeys_seed": str(self.nkey_seed_file)}
        if self.user is None:
            return {}
        return {"user": self.user, "password": self.password or ""}

    def describe(self) -> str:
        """Who logs in, for messages: ``user 'x'``, ``nkey U...`` or ``an anonymous client`` (no secret)."""
        if self.nkey is not None:
            return f"nkey {self.nkey}"
        return f"user {self.user!r}" if self.user else "an anonymous client"

    @classmethod
    def from_files(cls, user: str | None, password_file: Path | str | None,
                   nkey_seed_file: Path | str | None = None) -> NatsCredentials:
        """``user`` with the password read from ``password_file`` (one trailing newline stripped), or the
        nkey whose seed (``SU...``, as ``nk -gen user`` writes it) is in ``nkey_seed_file``.

        Raises:
            NatsAuthError: a password file without a user (or the reverse), both a password and an nkey,
                an unreadable file, or a file that holds no nkey user seed.
        """
        if nkey_seed_file is not None:
            if user is not None or password_file is not None:
                raise NatsAuthError("give --nats-nkey-seed-file or --nats-user/--nats-password-file, not both")
            return cls(nkey_seed_file=Path(nkey_seed_file), nkey=nkey_public_key(nkey_seed_file))
        if user is None and password_file is None:
            return cls()
        if user is None or password_file is None:
            raise NatsAuthError("give both --nats-user and --nats-password-file, or neither")
        try:
            password = Path(password_file).read_text()
        except OSError as exc:
            raise NatsAuthError(f"cannot read NATS password file {password_file}: {exc.strerror}") from None
        return cls(user, password.removesuffix("\n"))


def nkey_public_key(seed_file: Path | str) -> str:
    """The public key (``U...``) of the nkey user seed in ``seed_file``.

    Raises:
        NatsAuthError: the file is unreadable, or holds no valid user seed (the message never shows it).
    """
    try:
        import nkeys
    except ImportError:
        raise NatsAuthError("nkey logins need the nkeys package: pip install 'bookcast[server]'") from None
    try:
        seed = bytearray(Path(seed_file).read_bytes().strip())
    except OSError as exc:
        raise NatsAuthError(f"cannot read NATS nkey seed file {seed_file}: {exc.strerror}") from None
    try:
        pair = nkeys.from_seed(seed)
        public = pair.public_key.decode()
        pair.wipe()
    except Exception:  # noqa: BLE001 - nkeys raises its own errors and binascii/nacl ones for garbage
        raise NatsAuthError(f"NATS nkey seed file {seed_file} holds no valid nkey seed") from None
    finally:
        seed[:] = b"\0" * len(seed)
    if not public.startswith("U"):
        raise NatsAuthError(f"NATS nkey seed file {seed_file} holds a {public[0]}-key seed, not a user (U) seed")
    return public
