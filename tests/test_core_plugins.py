"""Plugins are found through their entry points, selected by config, blocked by the
environment or the command line, and fail loudly and by name when broken."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import echo_status, run_cli
from dicomgate import Dimse, Service, hookimpl
from dicomgate.errors import PluginError

PACKAGES = {
    # A well-behaved third-party plugin: a command, a settings section and a service.
    "hello": '''
        import attrs, click
        from dicomgate import hookimpl

        @attrs.frozen
        class HelloSettings:
            greeting: str = "hello"

        @hookimpl
        def register_settings(register):
            register("hello", settings=HelloSettings, example="[hello]\\ngreeting = \\"hi\\"\\n")

        @click.command()
        def hello():
            """Say hello."""
            click.echo("hello from a plugin")

        @hookimpl
        def register_commands(cli):
            cli.add_command(hello)
    ''',
    "broken": '''
        raise RuntimeError("this plugin cannot start")
    ''',
    "typo": '''
        from dicomgate import hookimpl

        @hookimpl
        def register_servics(register):
            pass
    ''',
}


def _install(name: str, body: str, where: Path) -> Path:
    """pip-install a one-module package named dicomgate-NAME into its own folder."""
    source = where / f"src-{name}"
    module = f"dicomgate_{name}"
    (source / module).mkdir(parents=True)
    (source / module / "__init__.py").write_text(textwrap.dedent(body))
    (source / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "dicomgate-{name}"
        version = "1.2.3"
        [project.entry-points.dicomgate]
        {name} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    '''))
    target = where / f"site-{name}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=120)
    return target


@pytest.fixture(scope="session")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each throw-away plugin package, installed into a folder of its own."""
    where = tmp_path_factory.mktemp("plugins")
    return {name: _install(name, body, where) for name, body in PACKAGES.items()}


def with_plugins(*folders: Path, **env: str) -> dict:
    return {"PYTHONPATH": ":".join(map(str, folders)), "DICOMGATE_BLOCK_PLUGINS": "",
            "DICOMGATE_CONFIG": "", **env}


def test_an_installed_plugin_is_found_through_its_entry_point(third_party, tmp_path):
    env = with_plugins(third_party["hello"])
    listed = run_cli("plugins", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["hello"]["loaded"]
    assert rows["hello"]["package"] == "dicomgate-hello"
    assert rows["hello"]["version"] == "1.2.3"
    assert rows["hello"]["hooks"] == ["register_commands", "register_settings"]
    assert rows["verification"]["package"] == "dicomgate"
    said = run_cli("hello", env=env, cwd=tmp_path)
    assert said.returncode == 0 and "hello from a plugin" in said.stdout
    example = run_cli("config", "example", env=env, cwd=tmp_path)
    assert '[hello]\ngreeting = "hi"' in example.stdout


def test_a_plugin_disabled_in_the_config_is_not_loaded(third_party, tmp_path):
    config = tmp_path / "clinic.toml"
    config.write_text('[plugins]\ndisabled = ["hello"]\n[hello]\ngreeting = "ignored"\n')
    listed = run_cli("plugins", "--json", "--config", str(config),
                     env=with_plugins(third_party["hello"]), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert not rows["hello"]["loaded"] and rows["hello"]["reason"] == "disabled in config"
    assert rows["verification"]["loaded"]
    assert run_cli("config", "check", str(config), env=with_plugins(third_party["hello"]),
                   cwd=tmp_path).returncode == 0


def test_enabled_lists_exactly_the_plugins_that_run(third_party, tmp_path):
    config = tmp_path / "clinic.toml"
    config.write_text('[plugins]\nenabled = ["hello"]\n')
    listed = run_cli("plugins", "--json", "--config", str(config),
                     env=with_plugins(third_party["hello"]), cwd=tmp_path)
    loaded = {row["name"] for row in json.loads(listed.stdout) if row["loaded"]}
    assert loaded == {"hello"}


@pytest.mark.parametrize("how", ["environment", "option"])
def test_a_plugin_can_be_blocked(third_party, tmp_path, how):
    env = with_plugins(third_party["hello"], third_party["broken"])
    args = ["plugins", "--json"]
    if how == "environment":
        env["DICOMGATE_BLOCK_PLUGINS"] = "broken, hello"
    else:
        args = ["--block", "broken", "--block", "hello", *args]
    listed = run_cli(*args, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["broken"]["reason"] == rows["hello"]["reason"] == "blocked"
    assert rows["verification"]["loaded"]


def test_a_plugin_that_raises_on_import_is_named(third_party, tmp_path):
    result = run_cli("plugins", env=with_plugins(third_party["broken"]), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'broken'" in result.stderr and "dicomgate-broken 1.2.3" in result.stderr
    assert "this plugin cannot start" in result.stderr


def test_a_misspelled_hook_is_named_at_start(third_party, tmp_path):
    result = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                     env=with_plugins(third_party["typo"]), cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'typo'" in result.stderr and "dicomgate-typo 1.2.3" in result.stderr
    assert "register_servics" in result.stderr


def test_an_unknown_plugin_in_the_config_is_a_config_error(tmp_path):
    config = tmp_path / "clinic.toml"
    config.write_text('[plugins]\nenabled = ["verification", "nosuch"]\n')
    result = run_cli("config", "check", str(config), cwd=tmp_path,
                     env={"DICOMGATE_CONFIG": ""})
    assert result.returncode == 2
    assert "'nosuch'" in result.stderr


def test_builtin_plugins_share_one_name_for_entry_point_module_and_section():
    for ep in entry_points(group="dicomgate"):
        if ep.dist and ep.dist.name == "dicomgate":
            assert ep.value == f"dicomgate.plugins.{ep.name}"


def test_two_services_answering_the_same_sop_class_fail_at_start(dicomgate_start):
    class Second:
        @hookimpl
        def register_services(self, register):
            register(Service(name="echo2", sop_classes=["1.2.840.10008.1.1"],
                             handlers={Dimse.C_ECHO: lambda request: 0}))

    with pytest.raises(PluginError, match="both answer C-ECHO for SOP class 1.2.840.10008.1.1"):
        dicomgate_start(extra_plugins={"second": Second()})


def test_a_failing_notification_is_logged_and_the_others_still_run(dicomgate_start, caplog):
    seen = []

    class Failing:
        @hookimpl
        def association_accepted(self, association):
            raise RuntimeError("boom")

    class Listening:
        @hookimpl
        def association_accepted(self, association):
            seen.append(association.calling_ae)

    running = dicomgate_start(extra_plugins={"failing": Failing(), "listening": Listening()})
    assert echo_status(running.port, calling="MODALITY1") == 0x0000
    assert seen == ["MODALITY1"]
    assert "plugin 'failing' failed in association_accepted" in caplog.text
