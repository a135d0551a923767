"""The worklist's pure parts: matching values, transliteration, config checks."""

from __future__ import annotations

import pytest

from dicomgate.config import parse_config
from dicomgate.errors import ConfigError
from dicomgate.gateway import configure
from dicomgate.manager import Plugins
from dicomgate.plugins.worklist import charsets, matching
from dicomgate.plugins.worklist.matching import InvalidValue


@pytest.mark.parametrize("value, expected", [
    ("20250520", ("20250520", "20250520")),
    ("20250520-20250522", ("20250520", "20250522")),
    ("20250520-", ("20250520", None)),
    ("-20250520", (None, "20250520")),
    ("2025.05.20", ("20250520", "20250520")),
    (" 20250520 ", ("20250520", "20250520")),
])
def test_date_ranges(value, expected):
    assert matching.date_range(value, "D") == expected


@pytest.mark.parametrize("value, expected", [
    ("10", ("100000", "105959")),
    ("1030", ("103000", "103059")),
    ("103015.25", ("103015", "103015")),
    ("10:30", ("103000", "103059")),
    ("0900-1100", ("090000", "110059")),
    ("-0930", (None, "093059")),
    ("1700-", ("170000", None)),
])
def test_time_ranges(value, expected):
    assert matching.time_range(value, "T") == expected


@pytest.mark.parametrize("value, expected", [
    ("2025", ("20250101000000", "20251231235959")),
    ("202502", ("20250201000000", "20250228235959")),
    ("20250520103000-0300", ("20250520103000", "20250520103000")),
    ("20250520-20250521", ("20250520000000", "20250521235959")),
    ("202505201000-", ("20250520100000", None)),
    ("-2025052012", (None, "20250520125959")),
])
def test_datetime_ranges(value, expected):
    assert matching.datetime_range(value, "DT") == expected


@pytest.mark.parametrize("function, value", [
    (matching.date_range, "20251301"), (matching.date_range, "yesterday"),
    (matching.date_range, "-"), (matching.date_range, "2025-01-01-2025-02-01"),
    (matching.time_range, "2500"), (matching.time_range, "10h"),
    (matching.datetime_range, "2025x"),
])
def test_invalid_values(function, value):
    with pytest.raises(InvalidValue):
        function(value, "key")


def test_folding_and_names():
    assert matching.fold("ЁЛКИН^Фёдор^^") == "елкин^федор"
    assert matching.fold("Müller^JÜRGEN") == "müller^jürgen"
    assert matching.strip_name("Doe^John^^^=") == "Doe^John"


@pytest.mark.parametrize("text, scheme, expected", [
    ("Иванов^Пётр", "icao", "Ivanov^Petr"),
    ("Цой^Виктор", "icao", "Tsoi^Viktor"),
    ("Цой^Виктор", "gost", "Tcoi^Viktor"),
    ("Объедкова", "icao", "Obieedkova"),
    ("Объедкова", "gost", "Obedkova"),
    ("Їжак^Євген", "icao", "Izhak^Ievgen"),
    ("Әсем^Ғали", "icao", "Asem^Ghali"),
])
def test_transliteration(text, scheme, expected):
    assert charsets.transliterate(text, scheme) == expected


def test_converter_keeps_what_fits_and_spells_the_rest():
    latin = charsets.TextConverter("ISO_IR 100")
    assert latin.text("Müller") == "Müller"
    assert latin.text("Иванов") == "Ivanov"
    assert charsets.TextConverter("ISO_IR 100", uppercase=True).text("Straße") == "STRASSE"
    assert charsets.TextConverter("ISO_IR 144").text("Иванов") == "Иванов"
    assert charsets.TextConverter("ISO_IR 192").text("Әсем") == "Әсем"
    assert charsets.TextConverter("ISO_IR 6").text("Müller Ёлкин") == "Muller Elkin"


def _configure(raw):
    plugins = Plugins()
    plugins.load(parse_config({"plugins": {"enabled": ["worklist"]}}).plugins)
    return configure(parse_config({"plugins": {"enabled": ["worklist"]}, **raw}), plugins)


def test_config_is_checked_with_the_key_named():
    config = _configure({"worklist": {"routes": [{"modality": "CT", "ae_titles": "CT1"}]},
                         "peers": [{"ae_title": "CT1", "worklist": {"charset": "ISO_IR 144"}}]})
    route = config.plugin_settings["worklist"].routes[0]
    assert route.modality == ("CT",) and route.ae_titles == ("CT1",)
    assert config.peers[0].plugin_settings("worklist").charset == "ISO_IR 144"
    for raw, message in [
        ({"worklist": {"timezone": "Mars/Olympus"}}, "IANA"),
        ({"worklist": {"unknown_devices": "some"}}, "unknown_devices"),
        ({"worklist": {"keep_days": -1}}, "keep_days"),
        ({"worklist": {"routes": [{"modality": "CT"}]}}, "ae_titles"),
        ({"worklist": {"routes": [{"modality": 3, "ae_titles": "CT1"}]}}, "string"),
        ({"peers": [{"ae_title": "CT1", "worklist": {"charset": "KOI8-R"}}]}, "KOI8-R"),
        ({"peers": [{"ae_title": "CT1", "worklist": {"transliteration": "bgn"}}]}, "bgn"),
        ({"peers": [{"ae_title": "CT1", "worklist": {"colour": "red"}}]},
         "peers[0].worklist: unknown key colour"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _configure(raw)


def test_the_example_config_is_valid():
    import tomllib

    from dicomgate.plugins.worklist.settings import EXAMPLE

    raw = tomllib.loads(EXAMPLE)
    assert _configure(raw).plugin_settings["worklist"].keep_days == 7
