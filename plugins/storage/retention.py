"""Retention: with ``[storage] keep_days`` set, a background thread removes the studies
whose last instance arrived more than that many days ago, when the gateway starts and
then every hour (:meth:`Store.purge`, which ``dicomgate studies purge`` also uses)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from dicomgate.plugins.storage.store import PurgeReport, store_for

if TYPE_CHECKING:
    from dicomgate.gateway import Gateway

log = logging.getLogger("dicomgate.storage")

#: Seconds between two purges of a running gateway.
INTERVAL = 3600.0
#: Seconds ``stop`` waits for a purge in progress (it stops after the study at hand).
STOP_TIMEOUT = 30.0


def size_text(size: int) -> str:
    """``size`` bytes for people: ``512 bytes``, ``3.4 MiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


class Retention:
    """The retention worker of one gateway (``retention_for``)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.keep_days: int = gateway.settings("storage").keep_days
        self.interval = INTERVAL
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker (nothing to do when ``keep_days`` is 0)."""
        if self.keep_days <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomgate-retention",
                                        daemon=True)
        self._thread.start()
        log.info("storage: retention keeps studies %d day(s) after their last instance",
                 self.keep_days)

    def stop(self) -> None:
        """Stop the worker: a purge in progress ends after the study at hand."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=STOP_TIMEOUT)
        if thread.is_alive():
            log.warning("storage: the retention worker did not stop within %.0f s",
                        STOP_TIMEOUT)
        self._thread = None

    def run_once(self) -> PurgeReport:
        """One purge of the studies older than ``keep_days``, logged."""
        with self.gateway.database.connection_context():
            report = store_for(self.gateway).purge(timedelta(days=self.keep_days),
                                                   stop=self._stop.is_set)
        if report.studies:
            # Counts only: never patient names (nor study UIDs) in the log at INFO.
            log.info("storage: retention removed %d study(ies), %d instance(s), %s, "
                     "last received more than %d day(s) ago", report.studies,
                     report.instances, size_text(report.bytes_freed), self.keep_days)
        else:
            log.debug("storage: retention found no study older than %d day(s)",
                      self.keep_days)
        return report

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("storage: retention purge failed; next try in %.0f s",
                              self.interval)
            self._stop.wait(self.interval)


def retention_for(gateway: Gateway) -> Retention:
    """The gateway's retention worker (one per gateway, created on first use)."""
    return gateway.plugin_object("storage.retention", Retention)
