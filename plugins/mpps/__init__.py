"""Modality Performed Procedure Step SCP: what a device performed reaches the order
and the HIS.

Devices report a procedure step with N-CREATE (IN PROGRESS) and N-SET (COMPLETED or
DISCONTINUED). Each MPPS is kept with its full history, linked to the worklist's
scheduled steps through the ``find_scheduled_steps`` hook (unscheduled ones are kept
for reconciliation), moves those steps through ``change_step_status``, and is compared
with the images the storage plugin received (``instances_of_study``,
``instance_stored``). Order status changes and finished steps become events in an
outbox, written in the same transaction, that a worker delivers to the notifiers
plugins register (``register_notifiers``); this plugin registers the webhook.
Documented in ``docs/plugins/mpps.md``.
"""

from __future__ import annotations

from pynetdicom.sop_class import ModalityPerformedProcedureStep

from dicomgate import Dimse, Service, hookimpl
from dicomgate.plugins.mpps import api, commands, scp, webhook
from dicomgate.plugins.mpps.models import SCHEMA
from dicomgate.plugins.mpps.outbox import Event, order_stream, outbox_for
from dicomgate.plugins.mpps.settings import EXAMPLE, MppsSettings

__all__ = ["Event", "MppsSettings", "api"]

#: The plugin's name: entry point, config section, table prefix and service name.
NAME = "mpps"


@hookimpl
def register_settings(register):
    register(NAME, settings=MppsSettings, example=EXAMPLE)


@hookimpl
def register_schema(register):
    register(SCHEMA)


@hookimpl
def register_services(register, gateway):
    register(Service(name=NAME, sop_classes=[ModalityPerformedProcedureStep],
                     handlers={Dimse.N_CREATE: scp.handle_create, Dimse.N_SET: scp.handle_set}))


@hookimpl
def register_notifiers(register, gateway):
    notifier = webhook.from_settings(gateway.settings(NAME))
    if notifier is not None:
        register(webhook.NAME, notifier)


@hookimpl
def register_commands(cli):
    commands.add_commands(cli)


@hookimpl
def gateway_started(gateway):
    outbox_for(gateway).start()


@hookimpl
def gateway_stopping(gateway):
    outbox_for(gateway).stop()


@hookimpl
def instance_stored(gateway, instance):
    api.instance_arrived(gateway, str(instance.sop_instance_uid))


@hookimpl
def procedure_step_changed(gateway, step, status, source):
    api.step_changed(gateway, step, status, source)


@hookimpl
def publish_event(gateway, event_type, study_uid, payload):
    box = outbox_for(gateway)
    event_id = box.append(event_type, order_stream(study_uid), payload)
    box.wake_after_commit()
    return event_id
