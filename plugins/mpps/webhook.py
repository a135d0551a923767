"""The webhook notifier: each event is POSTed as JSON to the HIS, signed with HMAC-SHA256.

It uses the standard library's ``http.client`` rather than urllib: the worker can then
cut a request off at shutdown (by shutting the socket down), and nothing follows
redirects behind the HIS's back. A 2xx answer delivers the event; anything else,
including a redirect, is a failure that the outbox retries.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from dicomgate import __version__
from dicomgate.plugins.mpps.outbox import DeliveryError, Event

NAME = "webhook"
SIGNATURE_HEADER = "X-Dicomgate-Signature"


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the body with the shared secret (UTF-8)."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: recompute the signature and compare in constant time."""
    return hmac.compare_digest(signature(secret, body), header.strip())


class WebhookNotifier:
    """POST each event to ``url``."""

    def __init__(self, url: str, secret: str, timeout: float = 10.0,
                 headers: Mapping[str, str] | None = None, ca_file: str = ""):
        parts = urlsplit(url)
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.context = ssl.create_default_context(cafile=ca_file or None) if self.https else None
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:
        return f"WebhookNotifier({self.url!r})"

    def _connect(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request_headers(self, event: Event) -> dict[str, str]:
        return {
            **self.headers,
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": f"dicomgate/{__version__}",
            "X-Dicomgate-Event": event.type,
            "X-Dicomgate-Event-Id": event.id,
            "Idempotency-Key": event.id,
            "X-Dicomgate-Attempt": str(event.attempt),
            SIGNATURE_HEADER: signature(self.secret, event.body),
        }

    def deliver(self, event: Event) -> None:
        connection = self._connect()
        with self._lock:
            self._connection = connection
        try:
            connection.request("POST", self.path, body=event.body,
                               headers=self.request_headers(event))
            response = connection.getresponse()
            answer = response.read(4096)
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        finally:
            with self._lock:
                self._connection = None
            connection.close()
        if not 200 <= response.status < 300:
            text = answer.decode("utf-8", "replace").strip()[:200]
            raise DeliveryError(f"{self.url}: HTTP {response.status} {response.reason}"
                                + (f": {text}" if text else ""))

    def cancel(self) -> None:
        """Cut a request in progress off (called from another thread at shutdown)."""
        with self._lock:
            connection = self._connection
        sock: Any = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def from_settings(settings: Any) -> WebhookNotifier | None:
    if not settings.webhook_url:
        return None
    return WebhookNotifier(settings.webhook_url, settings.webhook_secret,
                           timeout=settings.webhook_timeout, headers=settings.webhook_headers,
                           ca_file=settings.webhook_ca_file)
