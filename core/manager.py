"""Finding, selecting and loading plugins.

Every plugin, built-in or third-party, is found the same way: an entry point in the
``dicomgate`` group whose name is the plugin's name. The config's ``[plugins]``
section selects which run, and ``DICOMGATE_BLOCK_PLUGINS`` (comma-separated) or
``dicomgate --block NAME`` keeps one out whatever the config says.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

import attrs
import pluggy

from dicomgate import PROJECT, hookspecs
from dicomgate.config import PluginSelection
from dicomgate.errors import PluginError

BLOCK_ENV = "DICOMGATE_BLOCK_PLUGINS"
BUILTIN_PACKAGE = "dicomgate"


@attrs.frozen
class PluginInfo:
    """A loaded plugin, as ``dicomgate plugins`` shows it."""

    name: str
    package: str
    version: str
    module: str
    hooks: tuple[str, ...]

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE


def installed_plugins() -> dict[str, EntryPoint]:
    """Entry points of every installed plugin, by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=PROJECT):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two installed packages provide a plugin named {ep.name!r}: "
                f"{_package_of(found[ep.name])} and {_package_of(ep)}")
        found[ep.name] = ep
    return found


def blocked_from_environment() -> set[str]:
    return {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


def _package_of(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist else "an unknown package"


def select(installed: Iterable[str], selection: PluginSelection, blocked: set[str]) -> list[str]:
    """The names to load, in a stable order; unknown names are errors."""
    installed = sorted(installed)
    unknown = [name for name in (*(selection.enabled or ()), *selection.disabled)
               if name not in installed]
    if unknown:
        raise PluginError(
            f"plugins: no plugin named {', '.join(map(repr, unknown))} is installed "
            f"(installed: {', '.join(installed) or 'none'})")
    wanted = installed if selection.enabled is None else list(selection.enabled)
    return [name for name in wanted if name not in selection.disabled and name not in blocked]


class Plugins:
    """The plugin manager of one gateway process."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.installed: dict[str, EntryPoint] = {}

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook

    def load(self, selection: PluginSelection = PluginSelection(),
             blocked: Iterable[str] = ()) -> None:
        """Import and register the selected plugins, then check every hook name."""
        self.installed = installed_plugins()
        blocked = set(blocked) | blocked_from_environment()
        for name in select(self.installed, selection, blocked):
            ep = self.installed[name]
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} ({_package_of(ep)}) failed to import "
                    f"{ep.value}: {type(exc).__name__}: {exc}") from exc
            self.register(plugin, name, package=ep.dist.name if ep.dist else "?",
                          version=ep.dist.version if ep.dist else "?")
        self.check()

    def register(self, plugin: ModuleType | object, name: str, package: str = "?",
                 version: str = "?") -> None:
        """Register one plugin object under ``name`` (tests and embedding use this too)."""
        try:
            self.manager.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({package} {version}): {exc}") from exc
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} ({package} {version}): {exc}") from exc
        hooks = tuple(sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or ()))
        module = getattr(plugin, "__name__", type(plugin).__qualname__)
        self.infos[name] = PluginInfo(name, package, version, module, hooks)

    def check(self) -> None:
        """Fail on a hook implementation whose name is not in the hookspecs."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.manager.get_name(exc.plugin) or "?"
            info = self.infos.get(name)
            where = f"{info.package} {info.version}" if info else "?"
            raise PluginError(
                f"plugin {name!r} ({where}) implements a hook dicomgate does not have: "
                f"{exc}") from exc

    def names(self) -> list[str]:
        return list(self.infos)
