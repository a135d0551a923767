"""What `pip install dicomgate` brings in must not be under the GPL (LGPL extras aside)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


def _closure(name: str, seen: dict[str, object]) -> None:
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    dist = distribution(name)
    seen[key] = dist
    for text in dist.requires or ():
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra, not part of the default install
        try:
            _closure(requirement.name, seen)
        except PackageNotFoundError:
            pass  # not needed on this Python (a backport), so not installed


def licence_of(dist) -> str:
    meta = dist.metadata
    texts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    texts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " | ".join(t for t in texts if t)


def test_no_gpl_in_the_default_install():
    seen: dict[str, object] = {}
    _closure("dicomgate", seen)
    assert {"pynetdicom", "pydicom", "pluggy", "peewee", "cattrs"} <= set(seen)
    offenders = {}
    for name, dist in seen.items():
        licence = licence_of(dist)
        if re.search(r"(?<![L])GPL|General Public License", licence) and \
                "Lesser" not in licence and "LGPL" not in licence:
            offenders[name] = licence
    assert not offenders, offenders
