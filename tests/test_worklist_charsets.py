"""Each device gets names it can display, checked on the bytes it receives: UTF-8,
ISO 8859-5, ISO 2022 with escapes, and transliterated Latin for Latin-only devices
(never a ``?`` where a letter was). DCMTK findscu is one of the devices."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomgate.plugins.worklist import api, charsets
from dicomgate.plugins.worklist.testing import Client, query

PEERS = [
    {"ae_title": "UTF8"},
    {"ae_title": "CYR", "worklist": {"charset": "ISO_IR 144"}},
    {"ae_title": "CYR2022", "worklist": {"charset": "\\ISO 2022 IR 144"}},
    {"ae_title": "LATIN", "worklist": {"charset": "ISO_IR 100"}},
    {"ae_title": "LATINUP", "worklist": {"charset": "ISO_IR 100", "uppercase": True}},
    {"ae_title": "GOST", "worklist": {"charset": "ISO_IR 100", "transliteration": "gost"}},
    {"ae_title": "ASCII", "worklist": {"charset": "ISO_IR 6"}},
]
ALL = [peer["ae_title"] for peer in PEERS]


@pytest.fixture
def gw(dicomgate_start):
    running = dicomgate_start(plugins=["verification", "worklist"], peers=PEERS,
                              settings={"worklist": {"timezone": "UTC"}})
    orders = [
        {"patient": {"id": f"P{n}", "name": name}, "accession": f"A{n}",
         "description": description,
         "steps": [{"modality": "CT", "station_ae": station, "description": description}]}
        for n, (name, description) in enumerate([
            ("Иванов^Пётр", "КТ головы"),
            ("Цой^Виктор", "КТ"),
            ("Їжачок^Євгенія", "Рентген"),  # Ukrainian
            ("Әбілқасымов^Ғалымжан", "Қазақ"),  # Kazakh
            ("Müller^Jürgen", "Kopf"),
        ])
        for station in ALL
    ]
    for n, order in enumerate(orders):
        order["accession"] = f"A{n}"
        order["patient"]["id"] = f"P{n}"
    api.add_orders(running.gateway, orders, records=False)
    return running


def raw_names(port: int, calling: str) -> dict[str, bytes]:
    """{patient ID: the Patient's Name value bytes exactly as received}."""
    with Client(port, calling) as client:
        responses = client.find(query({}, PatientName="", PatientID="", AccessionNumber="",
                                      RequestedProcedureDescription=""))
    assert responses[-1].status == 0x0000
    found = {}
    for response in responses[:-1]:
        found[str(response.identifier.PatientName)] = _value_bytes(response.raw, 0x0010, 0x0010)
        found.setdefault("_charset", _value_bytes(response.raw, 0x0008, 0x0005))
    return found


def _value_bytes(raw: bytes, group: int, element: int) -> bytes:
    """The value of a top-level element in explicit VR little endian bytes."""
    position = 0
    while position < len(raw):
        tag_group = int.from_bytes(raw[position:position + 2], "little")
        tag_element = int.from_bytes(raw[position + 2:position + 4], "little")
        vr = raw[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            length = int.from_bytes(raw[position + 8:position + 12], "little")
            start = position + 12
        else:
            length = int.from_bytes(raw[position + 6:position + 8], "little")
            start = position + 8
        if (tag_group, tag_element) == (group, element):
            return raw[start:start + length]
        if length == 0xFFFFFFFF:
            raise AssertionError("undefined length before the element looked for")
        position = start + length
    raise KeyError((group, element))


def names_bytes(port: int, calling: str) -> list[bytes]:
    names = raw_names(port, calling)
    charset = names.pop("_charset")
    return charset, sorted(names.values())


def test_utf8_device_gets_the_names_unchanged(gw):
    charset, names = names_bytes(gw.port, "UTF8")
    assert charset.strip() == b"ISO_IR 192"
    assert "Иванов^Пётр".encode() + b" " in names or "Иванов^Пётр".encode() in names
    assert any(name.rstrip() == "Әбілқасымов^Ғалымжан".encode() for name in names)


def test_iso_8859_5_device_gets_cyrillic_bytes(gw):
    charset, names = names_bytes(gw.port, "CYR")
    assert charset.strip() == b"ISO_IR 144"
    stripped = [name.rstrip(b" ") for name in names]
    assert "Иванов^Пётр".encode("iso8859_5") in stripped
    assert "Їжачок^Євгенія".encode("iso8859_5") in stripped  # in ISO 8859-5 too
    # A name with letters ISO 8859-5 lacks (Kazakh) is transliterated as a whole rather
    # than shown in two scripts.
    assert b"Abilqasymov^Ghalymzhan" in stripped
    # Latin-1 letters ISO 8859-5 lacks are spelled out as well.
    assert b"Muller^Jurgen" in stripped


def test_iso_2022_device_gets_escape_sequences(gw):
    charset, names = names_bytes(gw.port, "CYR2022")
    assert charset.strip(b" \x00") == b"\\ISO 2022 IR 144"
    assert b"\x1b-L" + "Иванов".encode("iso8859_5") + b"^" + b"\x1b-L" + \
        "Пётр".encode("iso8859_5") in [name.rstrip(b" ") for name in names]


@pytest.mark.parametrize("calling, expected", [
    ("LATIN", [b"Ivanov^Petr", b"Tsoi^Viktor", b"Izhachok^Ievgeniia", b"Abilqasymov^Ghalymzhan",
               "Müller^Jürgen".encode("latin-1")]),
    ("LATINUP", [b"IVANOV^PETR", b"TSOI^VIKTOR", b"IZHACHOK^IEVGENIIA",
                 b"ABILQASYMOV^GHALYMZHAN", "MÜLLER^JÜRGEN".encode("latin-1")]),
    ("GOST", [b"Ivanov^Petr", b"Tcoi^Viktor"]),
    ("ASCII", [b"Ivanov^Petr", b"Muller^Jurgen"]),
])
def test_latin_only_devices_get_transliterated_names(gw, calling, expected):
    charset, names = names_bytes(gw.port, calling)
    stripped = [name.rstrip(b" ") for name in names]
    for name in expected:
        assert name in stripped, (name, stripped)
    assert not any(b"?" in name for name in stripped)
    assert charset.strip() == {"ASCII": b"ISO_IR 6"}.get(calling, b"ISO_IR 100")


def test_descriptions_are_converted_too(gw):
    with Client(gw.port, "LATINUP") as client:
        responses = client.find(query({"ScheduledProcedureStepDescription": ""},
                                      AccessionNumber="", RequestedProcedureDescription=""))
    descriptions = {str(r.identifier.RequestedProcedureDescription) for r in responses[:-1]}
    assert descriptions == {"KT GOLOVY", "KT", "RENTGEN", "QAZAQ", "KOPF"}
    steps = {r.identifier.ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription
             for r in responses[:-1]}
    assert steps == descriptions


def test_transliteration_never_leaves_a_question_mark():
    for text in ("Їжак Євген Ґанна", "Әсем Ғали Қасым Ңұрлан Үміт Өмір Һ", "Ўладзімір Ёлка",
                 "Ђорђе Љубица", "Ζωή"):
        for charset in ("ISO_IR 100", "ISO_IR 6", "ISO_IR 144"):
            converted = charsets.TextConverter(charset).text(text)
            assert "?" not in converted and charsets.fits(charset, converted), (text, charset)


def test_a_latin_query_finds_a_cyrillic_patient(gw):
    with Client(gw.port, "LATIN") as client:
        responses = client.find(query({}, PatientName="IVANOV*", AccessionNumber=""))
    assert [str(r.identifier.PatientName) for r in responses[:-1]] == ["Ivanov^Petr"]


# DCMTK findscu as the device ---------------------------------------------------------------


def _findscu(dcmtk, port: int, calling: str, out: Path, *keys: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-W", "-aet", calling, "-aec", "DICOMGATE", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_dcmtk_findscu_gets_each_charset_in_bytes(gw, dcmtk, tmp_path):
    keys = ["PatientName=Иванов*", "SpecificCharacterSet=ISO_IR 192", "PatientID",
            "AccessionNumber", "ScheduledProcedureStepSequence[0].Modality",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle"]
    expected = {
        "UTF8": "Иванов^Пётр".encode(),
        "CYR": "Иванов^Пётр".encode("iso8859_5"),
        "LATIN": b"Ivanov^Petr",
        "LATINUP": b"IVANOV^PETR",
    }
    for calling, name in expected.items():
        out = tmp_path / calling
        result = _findscu(dcmtk, gw.port, calling, out, *keys)
        assert result.returncode == 0, result.stderr
        files = sorted(out.glob("rsp*.dcm"))
        assert len(files) == 1, (calling, result.stderr)
        data = files[0].read_bytes()
        assert name in data, (calling, data[-200:])
        assert b"?" not in dcmread(files[0]).get_item(0x00100010).value
        assert dcmread(files[0]).ScheduledProcedureStepSequence[0].ScheduledStationAETitle \
            == calling


def test_dcmtk_query_file_with_group_lengths(gw, dcmtk, tmp_path):
    """A query file written by dump2dcm with group lengths, as some consoles send it."""
    dump = tmp_path / "query.dump"
    dump.write_text(
        "(0008,0005) CS []\n"
        "(0008,0050) SH []\n"
        "(0010,0010) PN [*]\n"
        "(0010,0020) LO []\n"
        "(0010,21c0) US\n"
        "(0040,0100) SQ (Sequence with undefined length)\n"
        "  (fffe,e000) na (Item with undefined length)\n"
        "    (0008,0060) CS [CT]\n"
        "    (0040,0001) AE []\n"
        "    (0040,0002) DA []\n"
        "  (fffe,e00d) na (ItemDelimitationItem)\n"
        "(fffe,e0dd) na (SequenceDelimitationItem)\n", encoding="utf-8")
    query_file = tmp_path / "query.dcm"
    made = subprocess.run([dcmtk("dump2dcm"), "+g", "+te", str(dump), str(query_file)],
                          capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [dcmtk("findscu"), "-W", "-aet", "LATIN", "-aec", "DICOMGATE", "-X", "-od", str(out),
         "127.0.0.1", str(gw.port), str(query_file)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("rsp*.dcm"))
    assert len(files) == 5
    names = {str(dcmread(f).PatientName) for f in files}
    assert names == {"Ivanov^Petr", "Tsoi^Viktor", "Izhachok^Ievgeniia",
                     "Abilqasymov^Ghalymzhan", "Müller^Jürgen"}
