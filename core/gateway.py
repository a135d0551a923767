"""The running gateway: what every hook and handler is handed as ``gateway``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import peewee

from dicomgate import db
from dicomgate.config import Config, SettingsSchema, bind_plugin_settings
from dicomgate.errors import ConfigError, PluginError
from dicomgate.manager import Plugins
from dicomgate.peers import Peer, PeerDirectory
from dicomgate.services import Dimse, Service

log = logging.getLogger(__name__)
T = TypeVar("T")


def collect_settings(plugins: Plugins) -> dict[str, SettingsSchema]:
    """What each loaded plugin registered with ``register_settings``."""
    schemas: dict[str, SettingsSchema] = {}

    def register(plugin: str, settings: type | None = None, peer_settings: type | None = None,
                 example: str = "") -> None:
        if plugin not in plugins.infos:
            raise PluginError(f"register_settings: {plugin!r} is not a loaded plugin's name")
        schemas[plugin] = SettingsSchema(plugin, settings, peer_settings, example)

    plugins.hook.register_settings(register=register)
    return schemas


def configure(config: Config, plugins: Plugins) -> Config:
    """``config`` with every plugin section checked against the loaded plugins."""
    return bind_plugin_settings(config, collect_settings(plugins), set(plugins.infos),
                                set(plugins.installed))


def collect_schemas(plugins: Plugins) -> list[db.Schema]:
    schemas: list[db.Schema] = []
    plugins.hook.register_schema(register=schemas.append)
    return schemas


@attrs.define(eq=False)
class Gateway:
    """One dicomgate: its config, plugins, database, peers and services.

    Plugins receive it in hooks and handlers. Stable attributes: ``config``,
    ``hook``, ``database``, ``peers``, ``services``, ``data_dir``, ``ae_title``,
    :meth:`settings`, :meth:`plugin_object` and :meth:`collect_named`.
    """

    config: Config
    plugins: Plugins
    database: peewee.Database
    peers: PeerDirectory = attrs.field(init=False)
    services: tuple[Service, ...] = attrs.field(init=False, default=())
    _plugin_objects: dict[str, Any] = attrs.field(init=False, factory=dict)
    _plugin_objects_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    @classmethod
    def open(cls, config: Config, plugins: Plugins, upgrade: bool = False) -> Gateway:
        """Open the database (creating it on first start) and collect peers and services.

        ``config`` must already be :func:`configure`-d.
        """
        config.gateway.data_dir.mkdir(parents=True, exist_ok=True)
        database = db.open_database(config.gateway.database_url, config.gateway.durable)
        db.bind(database)
        try:
            db.prepare(database, collect_schemas(plugins), upgrade=upgrade)
            gateway = cls(config, plugins, database)
            gateway.peers = PeerDirectory(gateway._collect_peers(),
                                          config.gateway.accept_unknown_peers)
            gateway.services = gateway._collect_services()
        except BaseException:
            database.close_all()
            raise
        return gateway

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def ae_title(self) -> str:
        return self.config.gateway.ae_title

    @property
    def data_dir(self) -> Path:
        return self.config.gateway.data_dir

    def settings(self, plugin: str) -> Any:
        """The validated ``[plugin]`` section (the class the plugin registered)."""
        try:
            return self.config.plugin_settings[plugin]
        except KeyError:
            raise KeyError(f"plugin {plugin!r} registered no settings") from None

    def plugin_object(self, key: str, create: Callable[[Gateway], T]) -> T:
        """The object a plugin keeps for this gateway under ``key`` (a store, an
        outbox), made by ``create(gateway)`` on first use and shared by every thread."""
        with self._plugin_objects_lock:
            if key not in self._plugin_objects:
                self._plugin_objects[key] = create(self)
            return self._plugin_objects[key]

    def collect_named(self, hook_name: str, kind: str, method: str,
                      max_length: int = 64) -> dict[str, Any]:
        """Call a ``register_*`` hook whose ``register(name, thing)`` offers named
        objects (notifiers, renderers) and return them by name. A bad or repeated
        name, or an object without ``method``, is a PluginError naming the hook."""
        found: dict[str, Any] = {}

        def register(name: str, thing: Any) -> None:
            if not isinstance(name, str) or not name or len(name) > max_length:
                raise PluginError(f"{hook_name}: bad {kind} name {name!r}")
            if name in found:
                raise PluginError(f"{hook_name}: two {kind}s named {name!r}")
            if not callable(getattr(thing, method, None)):
                raise PluginError(f"{hook_name}: {kind} {name!r} has no {method}() method")
            found[name] = thing

        getattr(self.hook, hook_name)(register=register, gateway=self)
        return found

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of a notification hook; one failing does not stop
        the others, and is logged with the plugin's name."""
        caller = getattr(self.hook, hook_name)
        with self.database.connection_context():
            for impl in reversed(caller.get_hookimpls()):
                try:
                    impl.function(*[kwargs[name] for name in impl.argnames])
                except Exception:
                    log.exception("plugin %r failed in %s", impl.plugin_name, hook_name)

    def close(self) -> None:
        self.database.close_all()

    def _collect_peers(self) -> list[Peer]:
        peers = list(self.config.peers)
        self.hook.register_peers(register=peers.append, gateway=self)
        seen: set[tuple[str, str | None]] = set()
        for peer in peers:
            identity = (peer.ae_title, peer.host)
            if identity in seen:
                raise ConfigError(f"peer {peer.ae_title!r} at host {peer.host or 'any'} is "
                                  "declared twice (config and a plugin's register_peers)")
            seen.add(identity)
        return peers

    def _collect_services(self) -> tuple[Service, ...]:
        services: list[Service] = []
        self.hook.register_services(register=services.append, gateway=self)
        owners: dict[tuple[Dimse, str], Service] = {}
        for service in services:
            for sop_class in service.sop_classes:
                for message in service.handlers:
                    other = owners.setdefault((message, sop_class), service)
                    if other is not service:
                        raise PluginError(
                            f"services {other.name!r} and {service.name!r} both answer "
                            f"{message.value} for SOP class {sop_class}")
        return tuple(services)
