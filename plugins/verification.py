"""Verification: answers C-ECHO on the gateway, and ``dicomgate echo PEER`` sends one."""

from __future__ import annotations

import time

import click
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomgate import Dimse, Request, Service, hookimpl
from dicomgate.cli import config_option, load_config, parse_destination

SUCCESS = 0x0000


def answer_echo(request: Request) -> int:
    return SUCCESS


@hookimpl
def register_services(register):
    register(Service(name="echo", sop_classes=[Verification],
                     handlers={Dimse.C_ECHO: answer_echo}))


@click.command()
@click.argument("destination")
@config_option
@click.option("--called-aet", default=None,
              help="Called AE title for a HOST:PORT destination [default: ANY-SCP].")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the connection and the answer.")
@click.option("--count", type=click.IntRange(1), default=1, show_default=True,
              help="C-ECHO requests to send on the association.")
def echo(destination: str, config_file, called_aet: str | None, timeout: float,
         count: int) -> None:
    """Send C-ECHO to DESTINATION: a configured peer's AE title, or HOST:PORT.

    Exits 0 when every echo succeeded, 1 when the peer could not be reached or
    answered with a failure.
    """
    config = load_config()
    peer = parse_destination(destination, config, called_aet)
    ae = AE(ae_title=config.gateway.ae_title)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
    started = time.monotonic()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
        raise click.ClickException(
            f"C-ECHO to {peer.ae_title} at {peer.address}: association {why}")
    try:
        for number in range(1, count + 1):
            status = assoc.send_c_echo()
            code = getattr(status, "Status", None)
            elapsed = (time.monotonic() - started) * 1000
            if code != SUCCESS:
                what = "no answer" if code is None else f"status 0x{code:04X}"
                raise click.ClickException(
                    f"C-ECHO to {peer.ae_title} at {peer.address}: {what}")
            click.echo(f"C-ECHO {number} to {peer.ae_title} at {peer.address}: "
                       f"success in {elapsed:.0f} ms")
            started = time.monotonic()
    finally:
        assoc.release()


@hookimpl
def register_commands(cli):
    cli.add_command(echo)
