"""Modality Worklist SCP: the HIS's orders reach each device's own worklist.

Orders live in the database (:mod:`dicomgate.plugins.worklist.models`) and come in
through the Python API (:mod:`dicomgate.plugins.worklist.api`) or ``dicomgate worklist``.
Each device that queries (Basic Worklist Management, C-FIND) sees only the items for
its Scheduled Station AE Title, or routed to it by ``[[worklist.routes]]``, answered in
the character set it is configured with. Documented in ``docs/plugins/worklist.md``.
"""

from __future__ import annotations

from pynetdicom.sop_class import ModalityWorklistInformationFind

from dicomgate import Dimse, Service, hookimpl
from dicomgate.plugins.worklist import api, commands, scp
from dicomgate.plugins.worklist.models import SCHEMA
from dicomgate.plugins.worklist.settings import EXAMPLE, WorklistPeerSettings, WorklistSettings

__all__ = ["WorklistPeerSettings", "WorklistSettings", "api"]

#: The plugin's name: entry point, config section, table prefix and service name.
NAME = "worklist"


@hookimpl
def register_settings(register):
    register(NAME, settings=WorklistSettings, peer_settings=WorklistPeerSettings,
             example=EXAMPLE)


@hookimpl
def register_schema(register):
    register(SCHEMA)


@hookimpl
def register_services(register, gateway):
    register(Service(name=NAME, sop_classes=[ModalityWorklistInformationFind],
                     handlers={Dimse.C_FIND: scp.handle_find}))


@hookimpl
def register_commands(cli):
    commands.add_commands(cli)


@hookimpl
def find_scheduled_steps(gateway, references, station_ae):
    return api.find_for_references(gateway, references, station_ae)


@hookimpl
def change_step_status(gateway, step, status, source, performed):
    return api.change_for_mpps(gateway, int(step.pk), status, source, performed)
