"""The clinic's configuration: one TOML file, read into frozen attrs classes.

Reading happens in two steps because plugin sections can only be checked once the
plugins are loaded: :func:`read_config` checks everything the core owns and keeps
plugin sections raw; :func:`bind_plugin_settings` checks them against the classes the
plugins registered. Every problem is reported with the path of its key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from dicomgate.errors import ConfigError
from dicomgate.peers import Peer, check_ae_title, one_of

DEFAULT_AE_TITLE = "DICOMGATE"
DEFAULT_PORT = 11112
DEFAULT_DATA_DIR = Path("dicomgate-data")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Profiles are config files shipped with dicomgate that a clinic's config builds on.
PROFILES_DIR = Path(__file__).with_name("profiles")


def profile_names() -> tuple[str, ...]:
    """The profiles this dicomgate ships (``no-pacs`` ...)."""
    return tuple(sorted(path.stem for path in PROFILES_DIR.glob("*.toml")))


def profile_path(name: str) -> Path:
    """The shipped file of profile ``name``; a name that is not shipped is a ConfigError.
    The name is looked up among the shipped files, never joined into a path."""
    for path in PROFILES_DIR.glob("*.toml"):
        if path.stem == name:
            return path
    raise ConfigError(f"gateway.profile: unknown profile {name!r} (shipped: "
                      f"{', '.join(profile_names()) or 'none'})")


def _ae_title(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    check_ae_title(value)


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, not {value}")


@attrs.frozen
class GatewaySettings:
    """The ``[gateway]`` section: who dicomgate is on the network and where it keeps data."""

    ae_title: str = attrs.field(default=DEFAULT_AE_TITLE, validator=_ae_title)
    host: str = "0.0.0.0"
    #: 0 lets the system choose a free port (tests); the log says which.
    port: int = attrs.field(default=DEFAULT_PORT, validator=attrs.validators.and_(
        attrs.validators.ge(0), attrs.validators.le(65535)))
    data_dir: Path = DEFAULT_DATA_DIR
    database: str = ""
    accept_unknown_peers: bool = False
    #: Acknowledge only what is on disk: files and database commits are flushed
    #: (fsync, SQLite synchronous=FULL) before a success is answered. false trades
    #: that for speed, losing the last seconds of work on a power cut: benchmarks only.
    durable: bool = True
    log_level: str = attrs.field(default="INFO", validator=one_of(*LOG_LEVELS))
    #: The shipped profile this config builds on ("" none; see ``profile_names()``).
    profile: str = ""

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite file inside the data directory."""
        return self.database or f"sqlite:///{self.data_dir / 'index.sqlite'}"


@attrs.frozen
class Limits:
    """The ``[limits]`` section: what one association and the whole server may take."""

    max_associations: int = attrs.field(default=32, validator=_positive)
    #: Largest PDU dicomgate receives, in bytes; 0 means no limit.
    max_pdu: int = attrs.field(default=262_144, validator=attrs.validators.ge(0))
    #: Seconds to wait for association negotiation messages.
    acse_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Seconds to wait for a DIMSE message that is due (a response, the rest of a data set).
    dimse_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds an association may stay silent before it is aborted.
    network_timeout: float = attrs.field(default=120.0, validator=_positive)
    #: Seconds a clean shutdown waits for running associations before aborting them.
    shutdown_grace: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))


@attrs.frozen
class PluginSelection:
    """The ``[plugins]`` section. Without ``enabled`` every installed plugin runs."""

    enabled: tuple[str, ...] | None = None
    disabled: tuple[str, ...] = ()


@attrs.frozen
class PeerEntry:
    """A ``[[peers]]`` table before its plugin sub-tables are checked."""

    peer: Peer
    plugin_sections: Mapping[str, Mapping[str, Any]]
    index: int


@attrs.frozen
class Config:
    """A whole clinic configuration. ``plugin_settings`` is filled by
    :func:`bind_plugin_settings`; until then ``plugin_sections`` hold the raw tables."""

    gateway: GatewaySettings = GatewaySettings()
    limits: Limits = Limits()
    plugins: PluginSelection = PluginSelection()
    peer_entries: tuple[PeerEntry, ...] = ()
    plugin_sections: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    plugin_settings: Mapping[str, Any] = attrs.field(factory=dict)
    source: str | None = None

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(entry.peer for entry in self.peer_entries)

    def with_overrides(self, **gateway_changes: Any) -> Config:
        """A copy with some ``[gateway]`` values replaced (command-line options)."""
        changes = {key: value for key, value in gateway_changes.items() if value is not None}
        try:
            gateway = attrs.evolve(self.gateway, **changes)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), source="command line") from None
        return attrs.evolve(self, gateway=gateway)


def _strict_converter() -> cattrs.Converter:
    """A converter that takes TOML values as they are: no "12" for 12, no true for 1."""
    converter = cattrs.Converter(forbid_extra_keys=True)

    def exact(kind: type, name: str):
        def structure(value: Any, _: type) -> Any:
            if type(value) is bool and kind is not bool:
                raise TypeError(f"expected {name}, got a boolean")
            if not isinstance(value, kind):
                raise TypeError(f"expected {name}, got {type(value).__name__} {value!r}")
            return value
        return structure

    converter.register_structure_hook(str, exact(str, "a string"))
    converter.register_structure_hook(int, exact(int, "an integer"))
    converter.register_structure_hook(bool, exact(bool, "true or false"))
    converter.register_structure_hook(
        float, lambda v, _: float(exact((int, float), "a number")(v, _)))
    converter.register_structure_hook(Path, lambda v, _: Path(exact(str, "a path")(v, _)))
    return converter


converter = _strict_converter()


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, ForbiddenExtraKeysError):
        return "unknown key " + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, (TypeError, ValueError)) and str(exc):
        return str(exc)
    return f"invalid value ({type(exc).__name__})"


def structure(data: Any, cls: type, path: str) -> Any:
    """``data`` as an instance of the attrs class ``cls``, or ConfigError naming each key."""
    try:
        return converter.structure(data, cls)
    except ClassValidationError as exc:
        problems = cattrs.transform_error(exc, path=path, format_exception=_describe)
        raise ConfigError([_tidy(problem) for problem in problems]) from None
    except (TypeError, ValueError) as exc:
        # attrs validators run in the constructor, after cattrs checked the types.
        raise ConfigError(f"{path}: {exc}") from None


def _tidy(problem: str) -> str:
    """cattrs says "message @ path"; an integrator reads "path: message" faster."""
    message, _, where = problem.rpartition(" @ ")
    return f"{where}: {message}" if where else problem


_CORE_SECTIONS = {"gateway": GatewaySettings, "limits": Limits, "plugins": PluginSelection}
_PEER_KEYS = {field.name for field in attrs.fields(Peer)} - {"settings"}


def read_config(path: Path | None, profile: str | None = None) -> Config:
    """Read and check a config file; ``None`` gives the stated defaults of a bare start.

    A profile (``profile``, else the file's ``[gateway] profile``) is read first and
    the file's values override it: tables merge key by key, other values replace.
    """
    raw = {} if path is None else _read_toml(path)
    gateway = raw.get("gateway")
    name = profile or (gateway.get("profile") if isinstance(gateway, dict) else None)
    if name:
        if not isinstance(name, str):
            raise ConfigError("gateway.profile: expected a string", source=str(path))
        raw = _merged(_read_toml(profile_path(name)), raw)
        raw.setdefault("gateway", {})["profile"] = name
    if path is None:
        # A bare start (no file of the clinic's) accepts any calling peer, warned.
        raw.setdefault("gateway", {}).setdefault("accept_unknown_peers", True)
        if not name:
            return Config(gateway=GatewaySettings(accept_unknown_peers=True))
    return parse_config(raw, source=str(path) if path else f"profile {name}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_config(raw: Mapping[str, Any], source: str = "config") -> Config:
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for name, cls in _CORE_SECTIONS.items():
        try:
            parts[name] = structure(raw.get(name, {}), cls, name)
        except ConfigError as exc:
            problems += exc.problems
    peer_entries = _read_peers(raw.get("peers", []), problems)
    sections = {}
    for name, value in raw.items():
        if name in _CORE_SECTIONS or name == "peers":
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: unknown key (plugin sections are tables: [{name}])")
        else:
            sections[name] = value
    if problems:
        raise ConfigError(problems, source=source)
    return Config(peer_entries=peer_entries, plugin_sections=sections, source=source, **parts)


def _read_peers(raw_peers: Any, problems: list[str]) -> tuple[PeerEntry, ...]:
    if not isinstance(raw_peers, list):
        problems.append("peers: expected [[peers]] tables")
        return ()
    entries: list[PeerEntry] = []
    seen: dict[tuple[str, str | None], int] = {}
    for index, raw in enumerate(raw_peers):
        path = f"peers[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{path}: expected a table")
            continue
        own = {key: value for key, value in raw.items() if key in _PEER_KEYS}
        sections = {key: value for key, value in raw.items() if key not in _PEER_KEYS}
        for key, value in sections.items():
            if not isinstance(value, dict):
                problems.append(f"{path}.{key}: unknown key")
        try:
            peer = structure(own, Peer, path)
        except ConfigError as exc:
            problems += exc.problems
            continue
        identity = (peer.ae_title, peer.host)
        if identity in seen:
            problems.append(
                f"{path}: AE title {peer.ae_title!r} at host {peer.host or 'any'} is "
                f"already peers[{seen[identity]}]")
        seen.setdefault(identity, index)
        entries.append(PeerEntry(peer=peer, plugin_sections=sections, index=index))
    return tuple(entries)


@attrs.frozen
class SettingsSchema:
    """What a plugin registered for its config section (see ``register_settings``)."""

    plugin: str
    settings: type | None = None
    peer_settings: type | None = None
    example: str = ""


def bind_plugin_settings(config: Config, schemas: Mapping[str, SettingsSchema],
                         loaded: set[str], installed: set[str]) -> Config:
    """Check plugin sections against the loaded plugins' schemas.

    A section for an installed plugin that is not loaded (disabled or blocked) is
    left alone; a section naming no installed plugin is an unknown key.
    """
    problems: list[str] = []
    settings: dict[str, Any] = {}
    for name, section in config.plugin_sections.items():
        if name not in loaded:
            if name not in installed:
                problems.append(f"{name}: unknown section (no plugin named {name!r} is installed)")
        elif name not in schemas or schemas[name].settings is None:
            problems.append(f"{name}: plugin {name!r} takes no settings")
    for name, schema in schemas.items():
        if schema.settings is None:
            continue
        try:
            settings[name] = structure(config.plugin_sections.get(name, {}), schema.settings, name)
        except ConfigError as exc:
            problems += exc.problems
    entries = []
    for entry in config.peer_entries:
        peer_settings: dict[str, Any] = {}
        for name, schema in schemas.items():
            section = entry.plugin_sections.get(name)
            path = f"peers[{entry.index}].{name}"
            if schema.peer_settings is None:
                if section:
                    problems.append(f"{path}: plugin {name!r} takes no per-peer settings")
                continue
            try:
                peer_settings[name] = structure(section or {}, schema.peer_settings, path)
            except ConfigError as exc:
                problems += exc.problems
        for name in entry.plugin_sections:
            if name not in loaded and name not in installed:
                problems.append(f"peers[{entry.index}].{name}: unknown key")
        entries.append(attrs.evolve(entry, peer=attrs.evolve(entry.peer, settings=peer_settings)))
    if problems:
        raise ConfigError(problems, source=config.source or "config")
    return attrs.evolve(config, plugin_settings=settings, peer_entries=tuple(entries))
