"""Write docs/hooks.md from the hookspecs: `python docs/hooks_reference.py`.

The docstrings in core/hookspecs.py are the plugin API reference; this page presents
them by section. tests/test_docs.py fails when the page and the specs disagree.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dicomgate import hookspecs

INTRO = """\
# Hook reference

Every hook a plugin can implement, as declared in `core/hookspecs.py` (the import
`dicomgate.hookspecs`). This page is written from those docstrings by
`python docs/hooks_reference.py`; a test fails when the two disagree on a hook's name,
arguments or `firstresult`.

Implement a hook with a function of the same name marked `@dicomgate.hookimpl`. It may
accept any subset of the arguments, by name: the core always calls hooks with keyword
arguments, so arguments added later break no plugin. Registration hooks are called once
at start; notification hooks call every implementation and log, without re-raising, an
exception in one; `firstresult` lookups stop at the first implementation that returns
something other than `None`.
"""


def sections() -> list[tuple[str, list[str]]]:
    """(section title, hook names) in the order of the source's "# Title ---" comments."""
    found: list[tuple[str, list[str]]] = []
    for line in inspect.getsource(hookspecs).splitlines():
        title = re.match(r"# ([A-Z][\w ]+?) -{3,}$", line)
        hook = re.match(r"def (\w+)\(", line)
        if title:
            found.append((title.group(1), []))
        elif hook and found and hasattr(getattr(hookspecs, hook.group(1)), "dicomgate_spec"):
            found[-1][1].append(hook.group(1))
    return found


def render() -> str:
    lines = [INTRO]
    for title, names in sections():
        lines += [f"## {title}", ""]
        for name in names:
            fn = getattr(hookspecs, name)
            signature = inspect.signature(fn)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
            kind = ("**firstresult**: the first non-`None` answer wins."
                    if fn.dicomgate_spec["firstresult"] else
                    "Called for every plugin that implements it.")
            lines += [f"### `{name}({', '.join(signature.parameters)})`", "", "```python",
                      f"def {name}({params}) -> {signature.return_annotation}", "```", "",
                      kind, "", inspect.cleandoc(fn.__doc__), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("hooks.md").write_text(render(), encoding="utf-8")
