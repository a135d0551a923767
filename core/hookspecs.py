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

from collections.abc import Callable, Mapping, Sequence
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


@hookspec
def register_notifiers(register: Callable[[str, Any], None], gateway: Gateway) -> None:
    """Offer a way to deliver events to the clinic's systems: call ``register(name, notifier)``.

    Events (an order's status changed, a performed procedure step completed ...) are
    written to the MPPS plugin's outbox in the transaction of the change, and a worker
    hands each one to every notifier registered when it was written, in order per
    order, until the notifier accepts it (``docs/plugins/mpps.md`` documents the
    events). ``name`` (str, at most 64 characters) names the notifier in the outbox;
    ``notifier`` has:

    * ``deliver(event) -> None``: send one event; return when the receiver has it,
      raise any exception when it does not (it is tried again later, with backoff).
      ``event`` has ``id`` (the UUID that stays the same on every attempt: the
      receiver's idempotency key), ``type``, ``stream``, ``sequence``, ``body`` (the
      JSON, bytes, identical on every attempt), ``payload`` (the body decoded),
      ``attempt`` (1 for the first) and ``created``;
    * optionally ``cancel() -> None``: called from another thread at shutdown to cut a
      ``deliver`` in progress short.

    Called once per gateway, the first time an event is written or delivered; the
    gateway's config is available as ``gateway.settings(plugin)``.
    """


@hookspec
def register_renderers(register: Callable[[str, Any], None], gateway: Gateway) -> None:
    """Offer a way to turn a stored image into a picture for a document: call
    ``register(name, renderer)``.

    The JPEG export plugin registers ``"jpeg"``; a plugin adds PNG, thumbnails or a
    vendor format under a new name, and a site replaces the built-in one by listing
    other names in ``[jpeg] renderers``. ``name`` (str, at most 32 characters) is
    recorded with every picture made; a second renderer with the same name is a
    start-up error. ``renderer`` has:

    * ``render(path, options) -> Iterable``: render the DICOM file at ``path`` (a
      :class:`pathlib.Path`) with ``options`` (the export plugin's ``RenderOptions``:
      quality, max_size, frames, voi_index, fallback_window, window, caption, font)
      and return, as a list or a generator (each picture is written as it comes),
      one ``RenderedImage`` per selected frame (``frame``, ``frames``,
      ``data`` bytes, ``width``, ``height``, ``window``, ``lossy_source``,
      ``media_type``, ``extension``). Raise ``RenderError`` (or any exception) with a
      message for the clinic when the instance cannot be rendered, ``NotAnImage``
      for one without pixels; both classes live in
      ``dicomgate.plugins.jpeg.render``. Called from worker threads, several at once.

    Called once per gateway, when the export plugin first needs its renderers.
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


@hookspec(firstresult=True)
def find_scheduled_steps(gateway: Gateway, references: Sequence[Mapping[str, str]],
                         station_ae: str) -> list[Any] | None:
    """The scheduled procedure steps that a performed procedure step refers to.

    ``references`` are items of an MPPS's Scheduled Step Attributes Sequence, each a
    mapping with the keys ``study_uid``, ``accession``, ``requested_procedure_id`` and
    ``scheduled_step_id`` (strings, stripped, ``""`` when the device sent none: an
    unscheduled procedure); ``station_ae`` is the Performed Station AE Title (``""``
    when unknown), for telling apart steps of one order on different devices.

    ``firstresult``: the plugin that keeps orders (the worklist) answers with the
    records of the matching steps, the same records ``procedure_step_changed`` hands
    out (attributes ``pk``, ``step_id``, ``status``, ``accession``, ``procedure_id``,
    ``study_uid``, ``patient_id``, ``patient_name``, ``modality``, ``station_ae``), an
    empty list when none match; ``None`` from every plugin means nothing keeps orders
    here. A look-up only: nothing is changed.
    """


@hookspec(firstresult=True)
def find_instances(gateway: Gateway, study_uid: str = "", series_uid: str = "",
                   sop_instance_uid: str = "") -> Sequence[Any] | None:
    """The stored instances of a study, a series or one instance, as records of the
    storage plugin, in series and instance order.

    Give exactly one of the UIDs. ``firstresult``: the plugin that keeps images
    answers (an empty list when it has none); ``None`` from every plugin means
    nothing stores images here. JPEG export uses it for ``dicomgate export jpeg``.
    """


# Requests to other plugins ---------------------------------------------------------------


@hookspec(firstresult=True)
def change_step_status(gateway: Gateway, step: Any, status: str, source: str,
                       performed: Mapping[str, Any]) -> Any | None:
    """Ask the plugin that keeps orders to move a scheduled procedure step to ``status``.

    ``step`` is a record ``find_scheduled_steps`` returned; ``status`` is a Scheduled
    Procedure Step Status (``STARTED``, ``COMPLETED``, ``DISCONTINUED``); ``source``
    says who asks (``"mpps"``); ``performed`` describes why (JSON-ready: the MPPS's
    ``sop_instance_uid``, ``status``, ``performed_procedure_step_id``, ``station_ae``,
    ``started``, ``ended``, ``images``).

    ``firstresult``: the plugin that keeps the step answers with its record after the
    request: changed, and ``procedure_step_changed`` notified; or unchanged when it
    already has that status or has left the worklist for good (its own rules decide).
    ``None`` from every plugin: nothing keeps orders here. Called inside the caller's
    database transaction, on the same connection: the change commits with the
    caller's work or not at all, so the implementation must not commit on its own
    (nested ``atomic()`` blocks are savepoints) and must raise rather than swallow a
    database error.
    """


@hookspec(firstresult=True)
def publish_event(gateway: Gateway, event_type: str, study_uid: str,
                  payload: Mapping[str, Any]) -> str | None:
    """Ask the plugin that keeps the outbox to send an event to the clinic's systems.

    ``event_type`` names the event (``"document.ready"``); ``study_uid`` is the Study
    Instance UID of the order it concerns, which puts it in that order's stream, after
    the order's earlier events; ``payload`` is JSON-ready and becomes the event's
    body next to the outbox's own keys (``version``, ``id``, ``type``, ``occurred``,
    ``stream``, ``sequence``, ``gateway``).

    ``firstresult``: the MPPS plugin writes the event and returns its id (a UUID);
    ``None`` from every plugin means no outbox runs here, and the caller keeps its
    fact without telling anyone. Called inside the caller's database transaction, on
    the same connection: the event commits with the caller's change or not at all.
    """
