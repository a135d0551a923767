"""docs/ must say what the code does: every hook documented with its real signature,
and every config key of the core in the config reference."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import attrs
import pytest

from dicomgate import hookspecs
from dicomgate.config import GatewaySettings, Limits, PluginSelection
from dicomgate.peers import Peer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def specs() -> dict[str, object]:
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "dicomgate_spec")}


def documented() -> dict[str, dict[str, str]]:
    """{hook: {"heading": args, "signature": full def line, "body": text}} from hooks.md."""
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"^### `(\w+)\(([^)]*)\)`\n(.*?)(?=^### |^## |\Z)", text,
                             re.S | re.M):
        name, args, body = match.groups()
        signature = re.search(r"```python\n(def .*?)\n```", body, re.S)
        found[name] = {"heading": args, "signature": signature.group(1) if signature else "",
                       "body": body}
    return found


def test_every_hook_is_documented_and_nothing_else():
    assert sorted(documented()) == sorted(specs())


@pytest.mark.parametrize("name", sorted(specs()))
def test_the_documented_signature_is_the_hookspec(name):
    fn = specs()[name]
    doc = documented()[name]
    signature = inspect.signature(fn)
    assert doc["heading"] == ", ".join(signature.parameters)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    assert doc["signature"] == f"def {name}({params}) -> {signature.return_annotation}"
    firstresult = fn.dicomgate_spec["firstresult"]
    assert ("**firstresult**" in doc["body"]) == firstresult
    if firstresult:
        assert "firstresult" in fn.__doc__, "a firstresult hook says so in its docstring"
    first_paragraph = inspect.cleandoc(fn.__doc__).split("\n\n")[0]
    assert first_paragraph in doc["body"]


@pytest.mark.parametrize("cls, section", [(GatewaySettings, "[gateway]"), (Limits, "[limits]"),
                                          (PluginSelection, "[plugins]"), (Peer, "[[peers]]")])
def test_every_core_config_key_is_in_the_config_reference(cls, section):
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    assert f"## `{section}`" in text
    part = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    for field in attrs.fields(cls):
        if field.name == "settings":  # the per-plugin sub-tables, documented by each plugin
            continue
        assert f"`{field.name}`" in part, f"{section} {field.name} is not documented"
