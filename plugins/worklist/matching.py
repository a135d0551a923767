"""Turning the values of a worklist query into SQL conditions (PS3.4 C.2.2.2, K.6).

Every kind of matching a key can ask for is one function here, each returning a peewee
expression, so that the database does the filtering:

* universal matching: a zero-length value, or only ``*``: no condition;
* single value matching: equality (``%`` and ``_`` are ordinary characters);
* wild card matching: ``*`` and ``?`` become the database's own wildcards, with every
  character that is special to the database escaped;
* range matching of dates, times and date-times, open at either end;
* the combined date and time range of Scheduled Procedure Step Start Date and Time;
* list of UID matching;
* person names, optionally without regard to case (Cyrillic included) on a case-folded
  column, and in Latin transliteration for devices that are shown Latin names.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import peewee

#: Characters with a meaning in DICOM matching values.
DICOM_WILDCARDS = frozenset("*?")


class InvalidValue(ValueError):
    """A matching value that is not valid for its key (a date that is no date ...)."""


def fold(text: str) -> str:
    """``text`` as case-insensitive matching compares it: NFC, case-folded, ё as е, and
    trailing empty name components removed."""
    text = unicodedata.normalize("NFC", text).casefold().replace("ё", "е")
    return strip_name(text)


def strip_name(name: str) -> str:
    """A person name without trailing spaces and empty trailing components."""
    groups = [group.strip().rstrip("^").strip() for group in name.strip().split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def has_wildcards(value: str) -> bool:
    return any(char in DICOM_WILDCARDS for char in value)


def is_sqlite(database: peewee.Database) -> bool:
    database = getattr(database, "obj", database)  # a DatabaseProxy's target
    return isinstance(database, peewee.SqliteDatabase)


def wildcard(database: peewee.Database, column: Any, pattern: str) -> Any:
    """``column`` matches the DICOM ``pattern`` (``*`` any run, ``?`` one character),
    case-sensitively, every other character literal."""
    if is_sqlite(database):
        # GLOB is case-sensitive (LIKE folds ASCII) and knows * and ? already; only
        # its character class bracket needs escaping.
        return peewee.Expression(column, "GLOB", pattern.replace("[", "[[]"))
    escaped = (pattern.replace("!", "!!").replace("%", "!%").replace("_", "!_")
               .replace("*", "%").replace("?", "_"))
    return peewee.NodeList((column, peewee.SQL("LIKE"), escaped, peewee.SQL("ESCAPE '!'")))


def text(database: peewee.Database, column: Any, values: Sequence[str]) -> Any:
    """Single value or wild card matching on ``column``; several values: any of them."""
    plain = [value for value in values if not has_wildcards(value)]
    conditions = [wildcard(database, column, value) for value in values
                  if has_wildcards(value)]
    if len(plain) == 1:
        conditions.append(column == plain[0])
    elif plain:
        conditions.append(column.in_(plain))
    return any_of(conditions)


def any_of(conditions: Sequence[Any]) -> Any:
    result = conditions[0]
    for condition in conditions[1:]:
        result = result | condition
    return result


def all_of(conditions: Sequence[Any]) -> Any:
    result = conditions[0]
    for condition in conditions[1:]:
        result = result & condition
    return result


# Dates and times -----------------------------------------------------------------------

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _date(value: str, what: str) -> str:
    value = value.strip()
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", value):  # the old YYYY.MM.DD form
        value = value.replace(".", "")
    if not _DATE.match(value):
        raise InvalidValue(f"{what}: {value!r} is not a date (YYYYMMDD)")
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise InvalidValue(f"{what}: {value!r} is not a date (YYYYMMDD)") from None
    return value


def _time(value: str, what: str, upper: bool) -> str:
    """``HH[MM[SS[.F]]]`` (colons tolerated) as ``HHMMSS``: the first second of what it
    names, or with ``upper`` the last."""
    value = value.strip().replace(":", "")
    if not _TIME.match(value):
        raise InvalidValue(f"{what}: {value!r} is not a time (HHMMSS)")
    digits = value.split(".")[0]
    if int(digits[:2]) > 23 or (len(digits) >= 4 and int(digits[2:4]) > 59) or \
            (len(digits) == 6 and int(digits[4:6]) > 60):
        raise InvalidValue(f"{what}: {value!r} is not a time (HHMMSS)")
    return digits + ("595959"[len(digits):] if upper else "000000"[len(digits):])


def _split_range(value: str, what: str) -> tuple[str, str, bool]:
    value = value.strip()
    if value.count("-") > 1:
        raise InvalidValue(f"{what}: {value!r} is not a range (A-B, A-, -B)")
    low, dash, high = value.partition("-")
    if dash and not low.strip() and not high.strip():
        raise InvalidValue(f"{what}: {value!r} is a range without ends")
    return low.strip(), high.strip(), bool(dash)


def date_range(value: str, what: str) -> tuple[str | None, str | None]:
    """A DA matching value as (first day, last day); ``None`` is an open end."""
    low, high, is_range = _split_range(value, what)
    if not is_range:
        day = _date(low, what)
        return day, day
    return (_date(low, what) if low else None, _date(high, what) if high else None)


def time_range(value: str, what: str) -> tuple[str | None, str | None]:
    """A TM matching value as (first second, last second) ``HHMMSS``; ``None`` is open."""
    low, high, is_range = _split_range(value, what)
    if not is_range:
        return _time(low, what, upper=False), _time(low, what, upper=True)
    return (_time(low, what, upper=False) if low else None,
            _time(high, what, upper=True) if high else None)


_DT = re.compile(r"(\d{4}(?:\d{2}){0,5})(?:\.\d{1,6})?([+-]\d{4})?")


def _datetime(value: str, what: str, upper: bool) -> str:
    """A DT value as ``YYYYMMDDHHMMSS``: the first second it names, or with ``upper``
    the last. A UTC offset is dropped: times are compared as the gateway's local time."""
    match = _DT.fullmatch(value.strip())
    if not match:
        raise InvalidValue(f"{what}: {value!r} is not a date-time (YYYYMMDDHHMMSS)")
    digits = match.group(1)
    if not upper:
        full = digits + "0101000000"[len(digits) - 4:]
    elif len(digits) == 4:
        full = digits + "1231235959"
    elif len(digits) == 6:
        year, month = int(digits[:4]), int(digits[4:6])
        if not 1 <= month <= 12:
            raise InvalidValue(f"{what}: {value!r} is not a date-time (YYYYMMDDHHMMSS)")
        last = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
        full = digits + f"{last:02d}235959"
    else:
        full = digits + "235959"[len(digits) - 8:]
    try:
        dt.datetime.strptime(full, "%Y%m%d%H%M%S")
    except ValueError:
        raise InvalidValue(f"{what}: {value!r} is not a date-time (YYYYMMDDHHMMSS)") from None
    return full


def datetime_range(value: str, what: str) -> tuple[str | None, str | None]:
    """A DT matching value as (first, last) ``YYYYMMDDHHMMSS``; ``None`` is open.

    A ``-`` may be a UTC offset's sign as well as the range separator: a value that is
    one valid date-time is taken as such, otherwise the first ``-`` that leaves a valid
    date-time (or nothing) on each side separates the range.
    """
    value = value.strip()
    try:
        return _datetime(value, what, upper=False), _datetime(value, what, upper=True)
    except InvalidValue:
        if "-" not in value:
            raise
    for position, char in enumerate(value):
        if char != "-":
            continue
        low, high = value[:position].strip(), value[position + 1:].strip()
        try:
            first = _datetime(low, what, upper=False) if low else None
            last = _datetime(high, what, upper=True) if high else None
        except InvalidValue:
            continue
        if first is None and last is None:
            break
        return first, last
    raise InvalidValue(f"{what}: {value!r} is not a date-time range")


def between(column: Any, low: str | None, high: str | None) -> Any:
    """``low <= column <= high`` with open ends; empty values never match a range."""
    if low is not None and high is not None:
        return column.between(low, high) if low != high else column == low
    if low is not None:
        return column >= low
    return (column <= high) & (column != "")


def start_condition(date_value: str | None, time_value: str | None, date_column: Any,
                    time_column: Any, start_column: Any) -> Any | None:
    """Scheduled Procedure Step Start Date and Time, matched as one date-time range when
    both are given (PS3.4 C.2.2.2.5.1), each on its own otherwise."""
    dates = date_range(date_value, "ScheduledProcedureStepStartDate") if date_value else None
    times = time_range(time_value, "ScheduledProcedureStepStartTime") if time_value else None
    if dates is None and times is None:
        return None
    if times is None:
        return between(date_column, *dates)
    if dates is None:
        return between(time_column, *times)
    (first_day, last_day), (first_time, last_time) = dates, times
    conditions = [between(date_column, first_day, last_day)]  # lets the date index work
    low = first_day + (first_time or "000000") if first_day else None
    high = last_day + (last_time or "235959") if last_day else None
    if first_day is None and first_time is not None and last_day is None:
        conditions.append(time_column >= first_time)
    if low is not None or high is not None:
        conditions.append(between(start_column, low, high))
    return all_of(conditions)


def parse_date_for_storage(value: str, what: str) -> str:
    """A date given to the API (``YYYYMMDD`` or ``YYYY-MM-DD``) as ``YYYYMMDD``."""
    value = value.strip()
    if len(value) == 10 and value[4] in "-." and value[7] in "-.":
        value = value[:4] + value[5:7] + value[8:]
    return _date(value, what)


def parse_time_for_storage(value: str, what: str) -> str:
    """A time given to the API (``HHMM``, ``HH:MM``, ``HHMMSS`` ...) as ``HHMMSS``."""
    return _time(value, what, upper=False) if value.strip() else "000000"
