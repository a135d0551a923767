"""The ``[worklist]`` section and each peer's ``[peers.worklist]`` table."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, tzinfo
from typing import Any

import attrs

from dicomgate.peers import check_ae_title, one_of
from dicomgate.plugins.worklist import charsets

UNKNOWN_DEVICE_POLICIES = ("none", "own-ae-title", "all")


def _names(value: Any) -> tuple[str, ...]:
    """A TOML string or list of strings as a tuple (``"CT"`` is ``["CT"]``, not ``C, T``)."""
    if isinstance(value, str):
        return (value.strip(),)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value)
    raise TypeError(f"expected a string or a list of strings, got {value!r}")


def _ae_titles(value: Any) -> tuple[str, ...]:
    titles = _names(value)
    for title in titles:
        check_ae_title(title)
    return titles


def _optional_charset(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        charsets.check_charset(value)


def _charset(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    charsets.check_charset(value)


def _zone(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {value!r} is not an IANA time zone name "
                             "(such as Europe/Moscow)") from None


def _scheme(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and value not in charsets.SCHEMES:
        raise ValueError(f"{attribute.name} {value!r} is not one of "
                         f"{', '.join(charsets.SCHEMES)}")


@attrs.frozen
class Route:
    """One ``[[worklist.routes]]`` rule: items whose order names no Scheduled Station AE
    Title, and that match every condition given, go to ``ae_titles``.

    A condition is one value or a list (any of them matches), compared without regard
    to case and surrounding spaces; a condition left out matches everything. Rules are
    tried in the order written and the first one that matches an item decides.
    """

    ae_titles: Any = attrs.field(converter=_ae_titles)
    modality: Any = attrs.field(default=(), converter=_names)
    station_name: Any = attrs.field(default=(), converter=_names)
    location: Any = attrs.field(default=(), converter=_names)

    def __attrs_post_init__(self) -> None:
        if not self.ae_titles:
            raise ValueError("a route needs at least one AE title in ae_titles")


@attrs.frozen
class WorklistSettings:
    """``[worklist]``."""

    #: IANA time zone that decides what "today" is; empty: the system's local zone.
    timezone: str = attrs.field(default="", validator=_zone)
    #: Items whose Scheduled Procedure Step Start Date is more than this many days
    #: before today are no longer answered; 0 keeps them for ever.
    keep_days: int = attrs.field(default=7, validator=attrs.validators.ge(0))
    #: Most answers one query gets; 0: no limit. A peer's own max_answers wins.
    max_answers: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    #: What a caller that is no configured peer sees (only when
    #: gateway.accept_unknown_peers lets it in): "none", "own-ae-title" or "all".
    unknown_devices: str = attrs.field(default="none",
                                       validator=one_of(*UNKNOWN_DEVICE_POLICIES))
    #: Person names match without regard to case (Cyrillic too) and ё = е.
    case_insensitive_names: bool = True
    #: Defaults for devices that have no [peers.worklist] value of their own.
    charset: str = attrs.field(default="ISO_IR 192", validator=_charset)
    transliteration: str = attrs.field(default="icao", validator=_scheme)
    uppercase: bool = False
    routes: tuple[Route, ...] = ()

    def zone(self) -> tzinfo:
        """The configured zone, or the system's local one."""
        if self.timezone:
            return zoneinfo.ZoneInfo(self.timezone)
        return datetime.now().astimezone().tzinfo


@attrs.frozen
class WorklistPeerSettings:
    """``[peers.worklist]`` of one device."""

    #: More Scheduled Station AE Titles whose items this device sees besides its own.
    stations: Any = attrs.field(default=(), converter=_ae_titles)
    #: The device sees every device's items (a department's reporting station, say).
    see_all: bool = False
    #: Specific Character Set of the answers; unset: [worklist] charset.
    charset: str | None = attrs.field(default=None, validator=_optional_charset)
    #: "icao" (ICAO Doc 9303) or "gost" (GOST R 52535.1-2006) for Latin-only charsets.
    transliteration: str | None = attrs.field(default=None, validator=_scheme)
    #: Upper-case names and texts (devices that show only capitals).
    uppercase: bool | None = None
    #: Most answers one query of this device gets; unset: [worklist] max_answers.
    max_answers: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    #: Override [worklist] case_insensitive_names for this device.
    case_insensitive_names: bool | None = None


EXAMPLE = """\
# Modality Worklist SCP: each device queries its own worklist (docs/plugins/worklist.md).
[worklist]
# timezone = "Europe/Moscow"   # what "today" is; default: the system's zone
keep_days = 7                  # items scheduled more than 7 days ago are no longer answered
max_answers = 1000             # per query; 0: no limit
unknown_devices = "none"       # callers that are no configured peer: "none", "own-ae-title", "all"
case_insensitive_names = true
charset = "ISO_IR 192"         # default Specific Character Set of the answers
transliteration = "icao"       # Cyrillic for Latin-only devices: "icao" or "gost"
uppercase = false

# Orders that name no Scheduled Station AE Title: first matching rule decides.
# [[worklist.routes]]
# modality = "CT"
# location = ["Room 2", "Room 2a"]
# ae_titles = ["CT2"]

# Per device, in its [[peers]] table:
# [peers.worklist]
# stations = ["CT1B"]          # also see these stations' items
# see_all = false
# charset = "ISO_IR 100"       # Latin-1 only: names are transliterated
# uppercase = true
# max_answers = 200
"""
