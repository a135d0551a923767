"""The clinic config: stated defaults, a complete example, and mistakes named by key."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs
import pytest

from conftest import run_cli
from dicomgate.config import GatewaySettings, Limits, read_config
from dicomgate.errors import ConfigError
from dicomgate.testing import free_port

ENV = {"DICOMGATE_CONFIG": "", "DICOMGATE_BLOCK_PLUGINS": ""}


def test_no_file_means_the_stated_defaults():
    config = read_config(None)
    assert config.gateway.ae_title == "DICOMGATE"
    assert config.gateway.port == 11112
    assert config.gateway.host == "0.0.0.0"
    assert config.gateway.data_dir == Path("dicomgate-data")
    assert config.gateway.database_url == "sqlite:///dicomgate-data/index.sqlite"
    assert config.gateway.accept_unknown_peers is True
    assert config.plugins.enabled is None  # every installed plugin
    assert config.peers == ()


def test_a_config_file_admits_only_its_peers_by_default(tmp_path):
    path = tmp_path / "clinic.toml"
    path.write_text('[[peers]]\nae_title = "CT1"\n')
    config = read_config(path)
    assert config.gateway.accept_unknown_peers is False
    assert [peer.ae_title for peer in config.peers] == ["CT1"]


def test_the_example_is_complete_and_valid(tmp_path):
    printed = run_cli("config", "example", env=ENV, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    for cls, section in ((GatewaySettings, "[gateway]"), (Limits, "[limits]")):
        assert section in printed.stdout
        for field in attrs.fields(cls):
            assert f"\n{field.name} = " in printed.stdout, f"{section} {field.name} undocumented"
    path = tmp_path / "example.toml"
    path.write_text(printed.stdout)
    checked = run_cli("config", "check", str(path), env=ENV, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "OK: 2 peer(s)" in checked.stdout


BAD = [
    ('[gateway]\naetitle = "X"\n', "gateway: unknown key aetitle"),
    ('[gateway]\nport = "11112"\n', "gateway.port: expected an integer"),
    ('[gateway]\nport = 70000\n', "gateway: 'port' must be <= 65535"),
    ('[gateway]\nae_title = "A_TITLE_FAR_TOO_LONG"\n', "longer than 16 characters"),
    ('[limits]\nmax_associations = true\n', "limits.max_associations: expected an integer"),
    ('[limits]\nnetwork_timeout = -1\n', "network_timeout must be greater than 0"),
    ('[[peers]]\nhost = "10.0.0.1"\n', "peers[0].ae_title: required key missing"),
    ('[[peers]]\nae_title = "CT"\nkind = "printer"\n', "peers[0]: kind 'printer' is not one of modality, pacs"),
    ('[[peers]]\nae_title = "CT"\nport = "104"\n', "peers[0].port: expected an integer"),
    ('[[peers]]\nae_title = "CT"\ncolour = "red"\n', "peers[0].colour: unknown key"),
    ('[[peers]]\nae_title = "CT"\nhost = "10.0.0.1"\n[[peers]]\nae_title = "CT"\n'
     'host = "10.0.0.1"\n', "peers[1]: AE title 'CT' at host 10.0.0.1 is already peers[0]"),
    ('[nosuchplugin]\nx = 1\n', "nosuchplugin: unknown section"),
    ('[verification]\nx = 1\n', "verification: plugin 'verification' takes no settings"),
    ('title = "x"\n', "title: unknown key"),
    ('[gateway\n', "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[message for _, message in BAD])
def test_a_bad_config_names_the_key_and_exits_2(tmp_path, text, message):
    path = tmp_path / "clinic.toml"
    path.write_text(text)
    checked = run_cli("config", "check", str(path), env=ENV, cwd=tmp_path)
    assert checked.returncode == 2
    assert message in checked.stderr
    assert "Traceback" not in checked.stderr


def test_a_bad_config_starts_nothing(tmp_path):
    port = free_port()
    path = tmp_path / "clinic.toml"
    path.write_text(f'[gateway]\nport = {port}\ndata_dir = "{tmp_path / "data"}"\n'
                    '[limits]\nmax_pdu = "big"\n')
    served = run_cli("serve", "--config", str(path), env=ENV, cwd=tmp_path, timeout=30)
    assert served.returncode == 2
    assert "limits.max_pdu: expected an integer" in served.stderr
    assert not (tmp_path / "data").exists()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # still free: nothing listened


def test_all_problems_are_reported_at_once(tmp_path):
    path = tmp_path / "clinic.toml"
    path.write_text('[gateway]\nport = "x"\n[limits]\nmax_pdu = -1\n')
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert len(caught.value.problems) == 2


def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path):
    for args in (["serve", "--port", "many"], ["config", "check", str(tmp_path / "missing.toml")],
                 ["echo", "not-a-destination"], ["nosuchcommand"]):
        result = run_cli(*args, env=ENV, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr, args


def test_every_command_has_help(tmp_path):
    for args in ([], ["serve"], ["plugins"], ["config"], ["config", "example"],
                 ["config", "check"], ["db"], ["db", "upgrade"], ["db", "status"], ["echo"]):
        result = run_cli(*args, "--help", env=ENV, cwd=tmp_path)
        assert result.returncode == 0 and "Usage: dicomgate" in result.stdout, args


def test_echo_reaches_a_configured_peer_by_name(dicomgate_start, tmp_path):
    running = dicomgate_start()
    path = tmp_path / "clinic.toml"
    path.write_text(f'[[peers]]\nae_title = "DICOMGATE"\nhost = "127.0.0.1"\n'
                    f'port = {running.port}\n')
    result = run_cli("echo", "DICOMGATE", "--config", str(path), env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"C-ECHO 1 to DICOMGATE at 127.0.0.1:{running.port}: success" in result.stdout
    unreachable = run_cli("echo", f"127.0.0.1:{free_port()}", env=ENV, cwd=tmp_path)
    assert unreachable.returncode == 1 and "C-ECHO to ANY-SCP" in unreachable.stderr


def test_a_command_exit_code_reaches_the_shell(tmp_path):
    import click

    from dicomgate import cli as cli_module

    @click.command(name="fail-with-3")
    @click.pass_context
    def fail(ctx):
        ctx.exit(3)

    cli_module.cli.add_command(fail)
    try:
        with pytest.raises(SystemExit) as exited:
            cli_module.main(["fail-with-3"])
        assert exited.value.code == 3
    finally:
        cli_module.cli.commands.pop("fail-with-3")
