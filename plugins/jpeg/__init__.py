"""JPEG export: clinical-quality pictures of received images, attached to the
examination's medical document.

A study's document falls due when its procedure is reported COMPLETED (MPPS, through
``procedure_step_changed``), when the study received no image for a while
(``instances_received``), or on request (``dicomgate documents attach``). Worker
threads then make the pictures with the renderers plugins register
(``register_renderers``; this plugin registers ``"jpeg"``), keep them under the data
folder, and tell the HIS with a "document.ready" event through the outbox
(``publish_event``). Nothing here runs in an association's thread but a note that a
study has images. Documented in ``docs/plugins/jpeg.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dicomgate import hookimpl
from dicomgate.plugins.jpeg import commands, documents
from dicomgate.plugins.jpeg.models import SCHEMA
from dicomgate.plugins.jpeg.render import (
    NotAnImage,
    RenderedImage,
    RenderError,
    RenderOptions,
    iter_jpeg,
)
from dicomgate.plugins.jpeg.settings import EXAMPLE, JpegSettings
from dicomgate.plugins.jpeg.worker import exporter_for

__all__ = ["JpegRenderer", "JpegSettings", "NotAnImage", "RenderError", "RenderOptions",
           "RenderedImage"]

#: The plugin's name: entry point, config section and table prefix.
NAME = "jpeg"
#: The step status that makes a study's document due.
COMPLETED = "COMPLETED"


class JpegRenderer:
    """The built-in renderer: one JPEG per selected frame (see ``render.py``), made
    as they are asked for, so that a long cine loop is never in memory at once."""

    def render(self, path: Path, options: RenderOptions) -> Iterator[RenderedImage]:
        return iter_jpeg(path, options)


@hookimpl
def register_settings(register):
    register(NAME, settings=JpegSettings, example=EXAMPLE)


@hookimpl
def register_schema(register):
    register(SCHEMA)


@hookimpl
def register_renderers(register):
    register("jpeg", JpegRenderer())


@hookimpl
def register_commands(cli):
    commands.add_commands(cli)


@hookimpl
def gateway_started(gateway):
    exporter_for(gateway).start()


@hookimpl
def gateway_stopping(gateway):
    exporter_for(gateway).stop()


@hookimpl
def instances_received(gateway, instances):
    documents.note_arrivals(gateway, instances)
    exporter_for(gateway).wake()


@hookimpl
def procedure_step_changed(gateway, step, status):
    if status == COMPLETED:
        documents.note_completed(gateway, step)
        exporter_for(gateway).wake()
