"""Answering each device in the character set it can show.

pydicom encodes text with the answer's Specific Character Set, but a letter the set
lacks becomes ``?`` with only a warning. So before pydicom sees an answer, every text
value is checked letter by letter against the device's set: a value that fits is left
alone, anything else is transliterated (Cyrillic by ICAO Doc 9303 or GOST R
52535.1-2006 through ``iuliia``), and whatever letter is still missing is spelled by
``anyascii``, so no letter ever turns into ``?``.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

import attrs
import iuliia
from anyascii import anyascii
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

#: Transliteration schemes a device may be configured with.
SCHEMES = {"icao": iuliia.ICAO_DOC_9303, "gost": iuliia.GOST_52535}

#: Value representations whose values are text in the Specific Character Set.
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})

_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})


def split_charset(charset: str) -> list[str]:
    """A configured charset (``"ISO_IR 144"``, ``"\\\\ISO 2022 IR 144"``) as DICOM values."""
    return [part.strip() for part in charset.split("\\")]


def check_charset(charset: str) -> None:
    """Raise ValueError unless every value of ``charset`` is a term pydicom can encode."""
    for term in split_charset(charset):
        if term not in python_encoding:
            raise ValueError(f"charset {charset!r}: {term!r} is not a Specific Character "
                             "Set term (ISO_IR 192, ISO_IR 144, ISO_IR 100, "
                             "ISO 2022 IR 144 ...)")
    terms = split_charset(charset)
    if len(terms) > 1 and not all(t in _DEFAULT_REPERTOIRE or t.startswith("ISO 2022")
                                  for t in terms):
        raise ValueError(f"charset {charset!r}: only ISO 2022 terms can be combined")


def dataset_value(charset: str) -> str | list[str]:
    """``charset`` as the value of Specific Character Set in an answer."""
    terms = split_charset(charset)
    return terms[0] if len(terms) == 1 else terms


@functools.lru_cache(maxsize=64)
def _codecs(charset: str) -> tuple[str, ...]:
    codecs = []
    for term in split_charset(charset):
        codec = "ascii" if term in _DEFAULT_REPERTOIRE else python_encoding[term]
        if codec not in codecs:
            codecs.append(codec)
    if "ascii" not in codecs:
        codecs.append("ascii")  # every DICOM character set contains the default repertoire
    return tuple(codecs)


@functools.lru_cache(maxsize=65536)
def representable(charset: str, char: str) -> bool:
    """True when ``char`` can be written in ``charset`` as it is."""
    for codec in _codecs(charset):
        try:
            char.encode(codec)
        except (UnicodeEncodeError, LookupError):
            continue
        return True
    return False


def fits(charset: str, text: str) -> bool:
    if text.isascii():
        return True
    return all(representable(charset, char) for char in text)


def transliterate(text: str, scheme: str = "icao") -> str:
    """``text`` with Cyrillic spelled in Latin letters by ``scheme``, then every other
    letter outside ASCII spelled by anyascii (Ukrainian ї, є; Kazakh ә, ғ, қ ...)."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFC", text)
    latin = SCHEMES[scheme].translate(text)
    if latin.isascii():
        return latin
    return "".join(char if char.isascii() else anyascii(char) for char in latin)


def _fallback(charset: str, text: str) -> str:
    """Letters ``charset`` lacks, spelled by anyascii; the rest kept."""
    return "".join(char if representable(charset, char) else anyascii(char) for char in text)


@attrs.frozen
class TextConverter:
    """How one device gets its text: the charset, the transliteration scheme used when a
    value does not fit in it, and upper-casing."""

    charset: str = "ISO_IR 192"
    scheme: str = "icao"
    uppercase: bool = False

    def text(self, value: str) -> str:
        value = unicodedata.normalize("NFC", value)
        if not fits(self.charset, value):
            value = transliterate(value, self.scheme)
            if not fits(self.charset, value):
                value = _fallback(self.charset, value)
        if self.uppercase:
            value = value.upper()
            if not fits(self.charset, value):  # "ß".upper() is "SS"; some cases leave the set
                value = _fallback(self.charset, value)
        return value

    def apply(self, dataset: Dataset) -> Dataset:
        """Convert every text value of ``dataset`` in place (sequences included) and set
        its Specific Character Set."""
        self._convert(dataset)
        dataset.SpecificCharacterSet = dataset_value(self.charset)
        return dataset

    def _convert(self, dataset: Dataset) -> None:
        for element in dataset.iterall():
            if element.VR not in TEXT_VRS:
                continue
            value = element.value
            if value is None or value == "":
                continue
            if isinstance(value, (MultiValue, list, tuple)):
                converted = [self._one(item) for item in value]
                if converted != [item for item in value]:
                    element.value = converted
            else:
                converted = self._one(value)
                if converted is not value:
                    element.value = converted

    def _one(self, value: object) -> object:
        """``value`` converted; the same object when nothing changes."""
        if isinstance(value, PersonName):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            return value  # bytes that a plugin put there: left as they are
        if not self.uppercase and (text.isascii() or fits(self.charset, text)):
            return value
        converted = self.text(text)
        return value if converted == text else converted


def converted(converter: TextConverter, datasets: Iterable[Dataset]) -> list[Dataset]:
    return [converter.apply(dataset) for dataset in datasets]
