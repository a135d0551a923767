"""The exporter of one gateway: its renderers and the threads that make documents.

Rendering never runs in an association's thread: ``instance_stored`` and
``instances_received`` only write down that a study has images, and these threads
take documents as they fall due.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dicomgate import PluginError
from dicomgate.files import sweep_temporary
from dicomgate.plugins.jpeg import documents
from dicomgate.plugins.jpeg.render import RenderOptions

log = logging.getLogger("dicomgate.jpeg")


class Exporter:
    def __init__(self, gateway: Any):
        self.gateway = gateway
        self.settings = gateway.settings("jpeg")
        self.options: RenderOptions = documents.render_options(self.settings)
        self._renderers: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._woken = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def all_renderers(self) -> dict[str, Any]:
        """Every renderer the plugins registered (``register_renderers``), by name."""
        with self._lock:
            if self._renderers is None:
                self._renderers = self.gateway.collect_named("register_renderers",
                                                             "renderer", "render", 32)
            return self._renderers

    def renderers(self) -> dict[str, Any]:
        """The renderers ``[jpeg] renderers`` selects, in that order."""
        available = self.all_renderers()
        missing = [name for name in self.settings.renderers if name not in available]
        if missing:
            raise PluginError(f"[jpeg] renderers: no renderer named {', '.join(missing)} "
                              f"(registered: {', '.join(sorted(available)) or 'none'})")
        return {name: available[name] for name in self.settings.renderers}

    # Making documents ----------------------------------------------------------------------

    def make(self, document_pk: int) -> Any:
        """Make a claimed document; a build that breaks is given back for a later try."""
        try:
            return documents.build(self.gateway, document_pk, self.renderers(), self.options)
        except Exception as exc:
            log.exception("document %d: making its pictures failed; trying again later",
                          document_pk)
            documents.release(self.gateway, document_pk, str(exc) or type(exc).__name__)
            return None

    def run_due(self) -> int:
        """Make every document that is due now, in this thread; returns how many."""
        made = 0
        while not self._stop.is_set():
            with self.gateway.database.connection_context():
                document_pk = documents.claim_due(self.gateway)
                if document_pk is None:
                    return made
                self.make(document_pk)
            made += 1
        return made

    # Threads -----------------------------------------------------------------------------

    def wake(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    def start(self) -> None:
        if self._threads:
            return
        self.renderers()  # a misnamed renderer is a start-up error, not a stuck queue
        removed = sweep_temporary(documents.pictures_root(self.gateway))
        if removed:
            log.info("removed %d unfinished picture file(s) left by a crash", removed)
        self._stop.clear()
        for number in range(self.settings.workers):
            thread = threading.Thread(target=self._run, name=f"dicomgate-jpeg-{number + 1}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("JPEG export: %d worker(s), renderers %s", self.settings.workers,
                 ", ".join(self.settings.renderers))

    def stop(self) -> None:
        """Stop the workers; a document being made is finished or, past the wait,
        left claimed and taken again after the lease by the next start."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout=30)
            if thread.is_alive():
                log.warning("JPEG export: %s did not stop in time", thread.name)
        self._threads = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
                with self.gateway.database.connection_context():
                    wait = self._seconds_to_next()
            except Exception:
                log.exception("JPEG export: a round failed")
                wait = self.settings.poll_interval
            with self._wake:
                if not self._woken and not self._stop.is_set():
                    self._wake.wait(wait)
                self._woken = False

    def _seconds_to_next(self) -> float:
        poll = self.settings.poll_interval
        due = documents.next_due(self.gateway)
        if due is None:
            return poll
        return max(0.01, min(poll, (due - documents.utcnow()).total_seconds()))


def exporter_for(gateway: Any) -> Exporter:
    """The gateway's exporter (one per gateway, created on first use)."""
    return gateway.plugin_object("jpeg.exporter", Exporter)

