"""Storage SCP: receive images from any sender, store them durably as received, and
index them by patient, study and series.

Configured by the ``[storage]`` section (:class:`StorageSettings`); documented in
``docs/plugins/storage.md``. Other plugins learn about stored instances through the
``instance_stored`` and ``instances_received`` hooks, which hand them
:class:`StoredInstance` records, and may read the index through the models in
:mod:`dicomgate.plugins.storage.models`.
"""

from __future__ import annotations

from dicomgate import Dimse, Service, hookimpl
from dicomgate.plugins.storage import commands, scp
from dicomgate.plugins.storage.models import SCHEMA
from dicomgate.plugins.storage.retention import retention_for
from dicomgate.plugins.storage.settings import EXAMPLE, StorageSettings
from dicomgate.plugins.storage.store import (
    PurgeReport,
    Rejected,
    Store,
    StoredInstance,
    store_for,
)

__all__ = ["PurgeReport", "Rejected", "StorageSettings", "Store", "StoredInstance",
           "store_for"]

#: The plugin's name: entry point, config section and table prefix.
NAME = "storage"
#: The service name a peer's ``allow`` list refers to.
SERVICE = "store"


@hookimpl
def register_settings(register):
    register(NAME, settings=StorageSettings, example=EXAMPLE)


@hookimpl
def register_schema(register):
    register(SCHEMA)


@hookimpl
def register_services(register, gateway):
    store = store_for(gateway)
    store.prepare()
    register(Service(name=SERVICE, sop_classes=scp.STORAGE_SOP_CLASSES,
                     handlers={Dimse.C_STORE: scp.handle_store},
                     transfer_syntaxes=scp.TRANSFER_SYNTAXES, spool_dir=store.spool_dir))


@hookimpl
def gateway_started(gateway):
    store = store_for(gateway)
    store.sweep()
    store.finish_purges()
    retention_for(gateway).start()


@hookimpl
def gateway_stopping(gateway):
    retention_for(gateway).stop()


@hookimpl
def association_closed(gateway, association, outcome):
    scp.association_closed(gateway, association, outcome)


@hookimpl
def register_commands(cli):
    commands.add_commands(cli)


@hookimpl
def instances_of_study(gateway, study_uid):
    return store_for(gateway).instances_of_study(study_uid)


@hookimpl
def find_instances(gateway, study_uid, series_uid, sop_instance_uid):
    return store_for(gateway).find_instances(study_uid, series_uid, sop_instance_uid)
