"""TLS for the public listener: an ``ssl.SSLContext`` for aiohttp's ``TCPSite`` from PEM files.

Two ways to run bookcast with TLS (docs/security.md has both set-ups):

* **Here**: ``bookcast gateway --tls-cert-file cert.pem --tls-key-file key.pem`` (``wss://``, ``https://``).
  TLS 1.2 or newer, the ``ssl`` module's secure defaults (no compression, server cipher preference).
  Certificates are read at start: restart the workers to rotate them.
* **Behind a proxy** that terminates TLS (nginx, HAProxy, a cloud load balancer): the gateway listens in
  plain text on a private address; the proxy must forward the ``Upgrade``/``Connection`` headers for
  ``/v1/ws``, keep idle WebSocket connections open longer than the gateway's ping interval, and pass the
  ``Authorization`` header through. Per-source caps then see the proxy's address: set them to 0 and limit
  per client at the proxy.
"""
from __future__ import annotations

import ssl
from pathlib import Path

from feed.errors import LocalError


class TlsConfigError(LocalError, ValueError):
    """The certificate or key cannot be used (the message names the file and the reason)."""


def server_ssl_context(cert_file: Path | str, key_file: Path | str, *,
                       client_ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A server context with ``cert_file`` (PEM chain, leaf first) and ``key_file`` (PEM, unencrypted).

    ``client_ca_file`` turns on client-certificate verification (mutual TLS) against that CA bundle.

    Raises:
        TlsConfigError: a file is missing, unreadable, or the key does not match the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (cert_file, key_file, client_ca_file):
        if path is not None and not Path(path).is_file():
            raise TlsConfigError(f"TLS file not found: {path}")
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load TLS certificate {cert_file} with key {key_file}: {exc}") from None
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(str(client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"cannot load client CA file {client_ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
