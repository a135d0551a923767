"""The ``dicomgate`` command line. Plugins add commands with ``register_commands``."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import click

from dicomgate import __version__
from dicomgate.config import Config, profile_names, profile_path, read_config
from dicomgate.errors import UsageError
from dicomgate.gateway import Gateway, collect_settings, configure
from dicomgate.manager import Plugins, blocked_from_environment, installed_plugins
from dicomgate.peers import Peer

CONFIG_ENV = "DICOMGATE_CONFIG"
BUILTIN_COMMANDS = ("serve", "plugins", "config", "db")
EXAMPLE = Path(__file__).with_name("example.toml")


@attrs.define
class _State:
    config_path: Path | None
    blocked: tuple[str, ...]
    plugins: Plugins | None = None


def _state() -> _State:
    return click.get_current_context().find_object(_State) or _State(None, ())


def load_config() -> Config:
    """The config of the current command: its ``--config``, the root one, or defaults."""
    ctx = click.get_current_context()
    path = ctx.params.get("config_file") or _state().config_path
    return read_config(path, profile=ctx.params.get("profile"))


def load_plugins(config: Config) -> Plugins:
    """Load the plugins ``config`` selects, minus those blocked on the command line."""
    plugins = Plugins()
    plugins.load(config.plugins, blocked=_state().blocked)
    return plugins


@contextlib.contextmanager
def open_gateway(upgrade: bool = False, **overrides: Any) -> Iterator[Gateway]:
    """The gateway of the current command's config, open for the command's duration."""
    config = load_config().with_overrides(**overrides)
    plugins = load_plugins(config)
    gateway = Gateway.open(configure(config, plugins), plugins, upgrade=upgrade)
    try:
        yield gateway
    finally:
        gateway.close()


def parse_destination(destination: str, config: Config, called_aet: str | None = None) -> Peer:
    """A configured peer by AE title, or an ad-hoc one from ``HOST:PORT``."""
    for peer in config.peers:
        if peer.ae_title == destination.strip():
            if peer.host is None or peer.port is None:
                raise UsageError(f"peer {peer.ae_title!r} has no host and port in the config")
            return peer
    host, sep, port = destination.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"{destination!r} is neither a configured peer nor HOST:PORT")
    try:
        return Peer(ae_title=called_aet or "ANY-SCP", host=host.strip("[]"), port=int(port),
                    kind="other")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


config_option = click.option(
    "--config", "-c", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV, help=f"Clinic config file (TOML) [env: {CONFIG_ENV}].")

profile_option = click.option(
    "--profile", type=click.Choice(profile_names()),
    help="Build on a shipped profile (no-pacs: storage, worklist, MPPS and JPEG export "
         "with retention); a config file's own values override it.")


class _PluginCommands(click.Group):
    """Finds plugin commands once the root options (config, blocked plugins) are known."""

    def _plugin_group(self, ctx: click.Context) -> click.Group:
        state = ctx.find_object(_State) or _State(None, ())
        if state.plugins is None:
            config = read_config(ctx.params.get("config_file"))
            plugins = Plugins()
            plugins.load(config.plugins, blocked=tuple(ctx.params.get("block") or ()))
            state.plugins = plugins
        group = click.Group()
        state.plugins.hook.register_commands(cli=group)
        return group

    def list_commands(self, ctx: click.Context) -> list[str]:
        own = super().list_commands(ctx)
        try:
            extra = self._plugin_group(ctx).list_commands(ctx)
        except UsageError:
            extra = []
        return own + sorted(set(extra) - set(own))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            command = self._plugin_group(ctx).get_command(ctx, name)
        return command


@click.group(cls=_PluginCommands, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--block", multiple=True, metavar="PLUGIN",
              help="Do not load this plugin, whatever the config says (repeatable). "
                   "The environment variable DICOMGATE_BLOCK_PLUGINS does the same.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                                 case_sensitive=False),
              help="Log level (default: the config's gateway.log_level).")
@click.version_option(__version__, prog_name="dicomgate")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, block: tuple[str, ...],
        log_level: str | None) -> None:
    """dicomgate: a DICOM gateway between a clinic's information system, its devices
    and its PACS."""
    ctx.obj = _State(config_file, tuple(block))
    ctx.meta["dicomgate.log_level"] = log_level


def _setup_logging(config: Config) -> None:
    level = (click.get_current_context().meta.get("dicomgate.log_level")
             or config.gateway.log_level).upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if level != "DEBUG":
        # pynetdicom logs every message at INFO; dicomgate logs what an integrator needs.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@cli.command()
@config_option
@click.option("--host", help="Address to listen on [default: 0.0.0.0, all interfaces].")
@click.option("--port", type=click.IntRange(0, 65535), help="TCP port [default: 11112].")
@click.option("--ae-title", help="The gateway's AE title [default: DICOMGATE].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where files and the embedded database live [default: ./dicomgate-data].")
@profile_option
def serve(config_file: Path | None, host: str | None, port: int | None, ae_title: str | None,
          data_dir: Path | None, profile: str | None) -> None:
    """Run the gateway until SIGINT or SIGTERM.

    Without a config file it runs on the stated defaults, with every installed plugin
    (or the profile's) and any calling peer accepted.
    """
    from dicomgate.server import Server

    config = load_config().with_overrides(host=host, port=port, ae_title=ae_title,
                                          data_dir=data_dir)
    _setup_logging(config)
    if config.source is None or config.source.startswith("profile "):
        logging.getLogger("dicomgate").warning(
            "no config file: running on defaults%s (AE title %s, port %d, data in %s)",
            f" of profile {config.gateway.profile}" if config.gateway.profile else "",
            config.gateway.ae_title, config.gateway.port, config.gateway.data_dir.resolve())
    plugins = load_plugins(config)
    gateway = Gateway.open(configure(config, plugins), plugins)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = Server(gateway)
    try:
        server.start()
        stop.wait()
        logging.getLogger("dicomgate").info("shutting down")
    finally:
        server.stop()
        gateway.close()


@cli.command(name="plugins")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(config_file: Path | None, as_json: bool) -> None:
    """List installed plugins: loaded ones with their hooks, and why others are not."""
    config = load_config()
    plugins = load_plugins(config)
    rows = [dict(attrs.asdict(info), loaded=True, reason="") for info in plugins.infos.values()]
    blocked = set(_state().blocked) | blocked_from_environment()
    for name, ep in sorted(installed_plugins().items()):
        if name in plugins.infos:
            continue
        reason = "blocked" if name in blocked else "disabled in config"
        rows.append(dict(name=name, package=ep.dist.name if ep.dist else "?",
                         version=ep.dist.version if ep.dist else "?", module=ep.value,
                         hooks=[], loaded=False, reason=reason))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=list))
        return
    for row in rows:
        state = ", ".join(row["hooks"]) if row["loaded"] else f"({row['reason']})"
        click.echo(f"{row['name']:<14} {row['version']:<10} {row['package']:<22} {state}")


@cli.group(name="config")
def config_group() -> None:
    """Print an example config, or check one."""


@config_group.command()
@profile_option
def example(profile: str | None) -> None:
    """Print a complete, commented example config (core and every installed plugin), or
    the file of a profile, which a clinic's config can build on."""
    if profile:
        click.echo(profile_path(profile).read_text(encoding="utf-8"), nl=False)
        return
    plugins = Plugins()
    plugins.load(blocked=_state().blocked)
    text = EXAMPLE.read_text(encoding="utf-8")
    for schema in collect_settings(plugins).values():
        if schema.example:
            text += "\n" + schema.example.strip("\n") + "\n"
    click.echo(text, nl=False)


@config_group.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Check FILE: every wrong key is named, and the exit code is 2 if any."""
    config = read_config(file)
    plugins = load_plugins(config)
    config = configure(config, plugins)
    click.echo(f"{file}: OK: {len(config.peers)} peer(s), plugins: "
               f"{', '.join(plugins.names()) or 'none'}")


@cli.group(name="db")
def db_group() -> None:
    """Database schema: status and upgrade."""


@db_group.command()
@config_option
def upgrade(config_file: Path | None) -> None:
    """Create or migrate the database to this version's schema (back it up first)."""
    config = load_config()
    _setup_logging(config)
    with open_gateway(upgrade=True):
        pass
    click.echo("database is current")


@db_group.command()
@config_option
def status(config_file: Path | None) -> None:
    """Show each component's schema version in the database and in this dicomgate."""
    from dicomgate import db
    from dicomgate.gateway import collect_schemas

    config = load_config()
    plugins = load_plugins(config)
    database = db.open_database(config.gateway.database_url)
    db.bind(database)
    with database.connection_context():
        versions = db.schema_status([db.CORE_SCHEMA, *collect_schemas(plugins)])
    database.close_all()
    for component, (have, want) in versions.items():
        state = "missing" if have is None else "current" if have == want else "needs upgrade"
        click.echo(f"{component:<14} database {have or '-':<4} code {want:<4} {state}")


def main(argv: list[str] | None = None) -> None:
    try:
        # Without standalone mode, click returns ctx.exit(code)'s code instead of exiting.
        code = cli.main(args=argv, prog_name="dicomgate", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        problems = getattr(exc, "problems", None)
        if problems and len(problems) > 1:
            for problem in problems:
                click.echo(f"dicomgate: error: {exc.source}: {problem}", err=True)
        else:
            click.echo(f"dicomgate: error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
