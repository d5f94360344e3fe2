"""A client's NATS login as plain data (``NatsCredentials``), apart from ``feed.natsauth`` (which talks to
NATS), so the pure gateway config (``feed.gateway.config``) can hold one without importing a NATS client.
``feed.natsauth`` re-exports both names; import them from there.
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

    def connect_kwargs(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user, "password": self.password or ""}

    @classmethod
    def from_files(cls, user: str | None, password_file: Path | str | None) -> NatsCredentials:
        """``user`` with the password read from ``password_file`` (one trailing newline stripped).

        Raises:
            NatsAuthError: a password file without a user (or the reverse), or an unreadable file.
        """
        if user is None and password_file is None:
            return cls()
        if user is None or password_file is None:
            raise NatsAuthError("give both --nats-user and --nats-password-file, or neither")
        try:
            password = Path(password_file).read_text()
        except OSError as exc:
            raise NatsAuthError(f"cannot read NATS password file {password_file}: {exc.strerror}") from None
        return cls(user, password.removesuffix("\n"))
