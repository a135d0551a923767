"""The plugin API of dicomgate: every hook a plugin can implement.

A plugin is a module (or an object) registered under one name through the
``dicomgate`` entry-point group; that name is also its config section. It implements
hooks by defining functions with these names, marked with ``@dicomgate.hookimpl``,
and accepting any subset of the arguments listed here. The core always calls hooks
with keyword arguments, so new arguments can be added without breaking a plugin.

Hooks come in three kinds:

* registration hooks (``register_*``), called once at start, hand the plugin a
  ``register`` callable;
* notification hooks, called for every implementation ("collect-all"); an exception
  in one is logged with the plugin's name and does not stop the others, nor change a
  DIMSE status already decided;
* lookup hooks, marked ``firstresult``: the first implementation that returns
  something other than ``None`` answers, and the others are not called.

DIMSE requests are not hooks of their own: each :class:`dicomgate.Service` a plugin
registers names exactly one handler per (message, SOP class), and the core's
dispatcher calls it. This keeps pynetdicom's one-handler-per-event contract, and a
second plugin claiming the same SOP class fails at start instead of racing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from dicomgate.config import SettingsSchema
    from dicomgate.db import Schema
    from dicomgate.gateway import Gateway
    from dicomgate.peers import Peer
    from dicomgate.services import AssociationInfo, Service

hookspec = pluggy.HookspecMarker("dicomgate")


# Registration ------------------------------------------------------------------------


@hookspec
def register_settings(register: Callable[..., None]) -> None:
    """Declare the plugin's config section.

    Call ``register(plugin, settings=None, peer_settings=None, example="")``:

    * ``plugin`` (str): the plugin's name, which is also the section's name;
    * ``settings`` (type): a frozen attrs class with defaults for every field; the
      ``[plugin]`` table is checked against it (unknown keys and wrong types are
      config errors naming the key) and the instance is available as
      ``gateway.settings(plugin)``;
    * ``peer_settings`` (type): the same for the ``[peers.plugin]`` table of each
      peer, available as ``peer.plugin_settings(plugin)``;
    * ``example`` (str): a commented TOML snippet for ``dicomgate config example``.

    Called once at start, before the database opens.
    """


@hookspec
def register_schema(register: Callable[[Schema], None]) -> None:
    """Declare the plugin's tables: call ``register(dicomgate.Schema(...))``.

    A :class:`dicomgate.Schema` names the component (the plugin's name), the current
    schema version, its peewee models (subclasses of :class:`dicomgate.Model`) and the
    migrations from each older version. The core creates the tables of a new
    database and runs migrations on ``dicomgate db upgrade``.
    """


@hookspec
def register_services(register: Callable[[Service], None], gateway: Gateway) -> None:
    """Declare the SCP roles the plugin provides: call ``register(dicomgate.Service(...))``.

    Each service lists SOP classes, accepted transfer syntaxes and one handler per
    DIMSE message (see :class:`dicomgate.Service`). The server accepts exactly the
    presentation contexts that registered services declare. ``gateway`` is open
    (database ready) when this is called.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``dicomgate`` command line: ``cli.add_command(...)``.

    Commands get the running context with ``dicomgate.cli.open_gateway()`` or the
    loaded config with ``dicomgate.cli.load_config()``; user mistakes should raise
    ``click.UsageError`` or :class:`dicomgate.UsageError` (exit code 2, one line).
    """


@hookspec
def register_peers(register: Callable[[Peer], None], gateway: Gateway) -> None:
    """Add peers that do not come from the config file (a HIS directory, say).

    Call ``register(dicomgate.Peer(...))``. A peer with the same AE title and host as a
    configured one is a start-up error.
    """


@hookspec
def register_adapters(register: Callable[[str, Any], None]) -> None:
    """Offer vendor PACS behaviour: call ``register(name, adapter)``.

    An adapter describes how to talk to one make of PACS (query levels it accepts,
    wildcards it refuses, how it reaches move destinations). Peers select one by name
    with ``adapter = "name"`` in their config. The adapter interface is defined by
    the Query/Retrieve issue; until then adapters are only listed.
    """


# Lifecycle ---------------------------------------------------------------------------


@hookspec
def gateway_started(gateway: Gateway) -> None:
    """The server is listening: start background workers here.

    Notification; an exception stops the start (a worker that cannot run is a
    configuration problem the integrator must see).
    """


@hookspec
def gateway_stopping(gateway: Gateway) -> None:
    """The server stopped accepting associations: stop workers, flush what is pending.

    Notification; called once, also after a failed start.
    """


# Associations ------------------------------------------------------------------------


@hookspec
def association_accepted(gateway: Gateway, association: AssociationInfo) -> None:
    """A peer's association was accepted.

    Notification, called in the association's own thread before its first request.
    """


@hookspec
def association_closed(gateway: Gateway, association: AssociationInfo, outcome: str) -> None:
    """An accepted association ended.

    ``outcome`` is ``"released"``, ``"aborted"`` or ``"closed"`` (the connection
    dropped without either). Notification, called in the association's own thread
    after its last request was answered: the place to act on everything one
    association delivered.
    """


# Objects stored or changed -------------------------------------------------------------


@hookspec
def instance_stored(gateway: Gateway, instance: Any, association: AssociationInfo | None) -> None:
    """A DICOM instance is durably stored and indexed.

    ``instance`` is the storage plugin's record of it (a frozen attrs class
    documented with that plugin); ``association`` is the one that delivered it, or
    ``None`` for an import. Notification, called after the C-STORE is decided: an
    exception is logged and the sender still gets its success. Keep it quick, and
    put long work (rendering, forwarding) on a queue.
    """


@hookspec
def instances_received(gateway: Gateway, instances: Sequence[Any],
                       association: AssociationInfo | None) -> None:
    """Everything one association (or one import) stored, once it has ended.

    Notification; ``instances`` are the same records ``instance_stored`` received,
    in the order they arrived. Not called when nothing was stored.
    """


@hookspec
def procedure_step_changed(gateway: Gateway, step: Any, status: str, source: str) -> None:
    """A scheduled procedure step changed status (SCHEDULED, STARTED, COMPLETED ...).

    ``step`` identifies the step as the worklist plugin records it; ``source`` says
    who changed it (``"mpps"``, ``"cli"``, ``"api"``). Notification.
    """


@hookspec
def adjust_worklist_answers(gateway: Gateway, association: AssociationInfo, query: Any,
                            answers: list[Any]) -> None:
    """Add, remove or rewrite the worklist items about to answer one query.

    ``query`` is the Modality Worklist C-FIND identifier as the device sent it (a
    pydicom Dataset); ``answers`` is the list of answer identifiers (Datasets with
    text as Python strings, before the device's character set is applied), in the
    order they will be sent. Change the list in place: site rules, device quirks.
    Notification; a plugin that raises is logged and the others still run.
    """


# Lookups between plugins ---------------------------------------------------------------


@hookspec(firstresult=True)
def instances_of_study(gateway: Gateway, study_uid: str) -> Sequence[Any] | None:
    """The instances stored for the study ``study_uid``, as records of the storage plugin.

    ``firstresult``: the plugin that keeps images answers (an empty list when it has
    none of that study); ``None`` from every plugin means nothing stores images here.
    MPPS completeness and JPEG export ask it without importing the storage plugin.
    """
