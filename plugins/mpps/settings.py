"""The ``[mpps]`` config section: the HIS webhook and how undelivered events are retried."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, not {value}")


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be 1 or more, not {value}")


def _url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{attribute.name} {value!r} is not an http:// or https:// URL")


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError("expected a table of header names and string values")
    for name, text in value.items():
        if not name or any(c in name for c in " :\r\n") or any(c in text for c in "\r\n"):
            raise ValueError(f"header {name!r} is not a valid HTTP header")
    return dict(value)


@attrs.frozen
class MppsSettings:
    """``[mpps]``: where events for the HIS go, and how hard dicomgate tries."""

    #: The HIS endpoint that receives events (HTTP POST of JSON); empty: no webhook,
    #: events are kept in the outbox only.
    webhook_url: str = attrs.field(default="", validator=_url)
    #: Shared secret for the ``X-Dicomgate-Signature`` header (HMAC-SHA256 of the body).
    webhook_secret: str = ""
    #: Extra headers sent with every event (an ``Authorization`` the HIS wants, say).
    webhook_headers: Any = attrs.field(factory=dict, converter=_headers)
    #: Seconds to wait for the connection and for each read of the answer.
    webhook_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: A CA bundle (PEM) to check the HIS's certificate against; empty: the system's.
    webhook_ca_file: str = ""
    #: Seconds before the first retry of a failed delivery; each further retry waits
    #: ``retry_factor`` times longer, never more than ``retry_max``.
    retry_initial: float = attrs.field(default=5.0, validator=_positive)
    retry_factor: float = attrs.field(default=2.0, validator=_at_least_one)
    retry_max: float = attrs.field(default=600.0, validator=_positive)
    #: Seconds an event may keep failing before it is set aside as a dead letter
    #: (kept and listed; ``dicomgate outbox retry`` sends it again).
    dead_letter_after: float = attrs.field(default=86_400.0, validator=_positive)
    #: Seconds between looks for events written by other processes (the command line).
    poll_interval: float = attrs.field(default=5.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("webhook_secret is required with webhook_url: the HIS checks "
                             "each event's signature with it")


EXAMPLE = """\
[mpps]
# MPPS SCP: what the devices performed updates the worklist and reaches the HIS.
# Events (order status changes, completed or discontinued procedures) are kept in an
# outbox in the database and POSTed as JSON to this URL; empty: kept, not sent.
webhook_url = ""
# Shared secret: each request carries X-Dicomgate-Signature: sha256=<HMAC-SHA256 of
# the body>, which the HIS recomputes. Required with webhook_url.
webhook_secret = ""
# Extra headers for the HIS, e.g. { Authorization = "Bearer ..." }.
webhook_headers = {}
# Seconds to wait for the HIS to accept the connection and for each read.
webhook_timeout = 10.0
# CA bundle (PEM) for an https URL with a private certificate authority.
webhook_ca_file = ""
# Failed deliveries are retried after 5 s, then 10 s, 20 s ... at most every 600 s,
# for 86400 s (one day); then the event is set aside as a dead letter, listed by
# 'dicomgate outbox list --dead' and sent again by 'dicomgate outbox retry'.
# Events of one order are delivered in order: a later one waits for the earlier.
retry_initial = 5.0
retry_factor = 2.0
retry_max = 600.0
dead_letter_after = 86400.0
# Seconds between looks for events written by other processes (the command line).
poll_interval = 5.0
"""
