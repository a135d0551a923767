"""Event-driven waits for pynetdicom's acceptor-side reactors.

Why this exists
---------------
pynetdicom runs two polling loops per association, and both wait with fixed sleeps:

* the DUL thread (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay``
  (1 ms) whenever a pass found nothing to do;
* the association thread (``Association._run_reactor``) sleeps 1 ms on *every* pass
  before it looks at the DIMSE message queue.

A small C-STORE request and its response each have to wait out some of those sleeps,
which caps one association at a few hundred small images per second however fast the
peer is. Setting the delays to zero removes the cap but makes every idle association
spin a CPU core, which a server cannot afford.

:func:`speed_up` replaces the two sleeps, on one ``Association`` instance only, with
waits that end as soon as there is work:

* The DUL thread blocks in ``poll``/``select`` on the association's TCP socket and on a
  wake-up file descriptor (an ``eventfd`` on Linux, a socket pair elsewhere). Putting a
  primitive on ``dul.to_provider_queue`` signals that descriptor, and so do
  ``dul.stop_dul()`` and ``dul.kill_dul()``. The wait is capped at
  :data:`DUL_MAX_WAIT` so the ARTIM timer and the kill flag are still looked at.
* The association thread blocks on a :class:`threading.Event` that is set whenever
  something it reacts to happens: a message on ``dimse.msg_queue``, a primitive on
  ``dul.to_user_queue`` (A-RELEASE-RQ, A-ABORT, A-P-ABORT), a pause request
  (``_reactor_checkpoint.clear()``), ``assoc.kill()`` and the DUL thread ending. The
  wait is capped at :data:`ASSOC_MAX_WAIT` so the network (idle) timeout is noticed.

Every check of the original loops is kept, in the same order. One window of the stock
association loop is closed on the way: a thread that pauses the reactor (``send_*()``,
``release()``) right as the loop leaves its pause checkpoint could see it as paused
while it goes on to take the caller's response off the DIMSE queue; the replacement
re-checks the checkpoint after leaving it.

Nothing global is changed: no pynetdicom class or module attribute is patched, and
associations that were not passed to :func:`speed_up` (including every requestor-side
association) behave as stock pynetdicom.

What it touches, per association (all instance attributes):

``assoc._run_reactor``, ``assoc.kill``, ``assoc._reactor_checkpoint``,
``assoc.dimse.msg_queue``, ``assoc.dul.to_provider_queue``, ``assoc.dul.to_user_queue``,
``assoc.dul.run``, ``assoc.dul.run_reactor``, ``assoc.dul.stop_dul``,
``assoc.dul.kill_dul``, ``assoc.dul.socket.recv`` (reads a PDU in large blocks
instead of 4 KiB ones), plus its own ``assoc._dicomgate_tuning``. The replacement loops
use what the originals used: ``assoc.dul.socket.socket`` / ``._is_connected``,
``assoc.dul.event_queue``, ``assoc.dul.artim_timer``, ``assoc.dul._idle_timer``,
``assoc.dul._kill_thread``, ``assoc._dul_ready``, ``assoc._is_paused`` and
``assoc._kill``.

The DUL thread's ``run_reactor`` cannot be swapped by assigning the instance attribute
alone: ``DULServiceProvider.__init__`` hands the *bound* method to
``Thread.__init__(target=...)``, so the thread would still run the original. The
replacement therefore overrides ``dul.run`` (the method ``Thread`` calls) as well.

These are pynetdicom internals, so :func:`check_compatible` verifies them (and the
pynetdicom version, :data:`TESTED_RANGE`) and the server calls it at start.

Two socket options go with it: TCP_NODELAY, because every response is small and
awaited, and TCP_QUICKACK before every read, because a sender that leaves Nagle's
algorithm on (many devices do) otherwise waits for our delayed ACK before each small
message: measured on loopback, 200 small images from DCMTK storescu without
TCP_NODELAY took seconds instead of a fraction of one.

Cost: one extra file descriptor per association (two where ``os.eventfd`` is missing).
pynetdicom's own ``AssociationSocket.ready`` uses ``select.select``, which fails for
descriptors numbered 1024 or more, so this lowers the number of simultaneous
associations a process can hold before pynetdicom hits that limit (about 1000 -> 500).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import re
import secrets
import select
import socket
import struct
import tempfile
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt

log = logging.getLogger("dicomgate.tuning")
# The replacement loops log what the originals logged, under the same loggers
_LOG_ASSOC = logging.getLogger("pynetdicom.association")
_LOG_DUL = logging.getLogger("pynetdicom.dul")

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only

#: Longest the DUL thread blocks before re-checking its timers and kill flag (s).
DUL_MAX_WAIT = 0.05
#: Longest the association thread blocks before re-checking the idle timer (s).
ASSOC_MAX_WAIT = 0.05
#: pynetdicom versions this module was written and tested against: [low, high).
TESTED_RANGE = ((3, 0, 4), (3, 1, 0))

_MARKER = "_dicomgate_tuning"

try:  # pragma: no cover - depends on the Python build
    import ssl

    _SSLSocket: Any = ssl.SSLSocket
except ImportError:  # pragma: no cover
    _SSLSocket = ()


# --------------------------------------------------------------------------------------
# Wake-up primitives


class _FdWaker:
    """A file descriptor that becomes readable when :meth:`wake` is called.

    Repeated wakes before the reader drains collapse into one write. ``close`` is safe
    to race with ``wake``: a wake after close does nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = False
        self._closed = False
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            flags = getattr(os, "EFD_NONBLOCK", 0) | getattr(os, "EFD_CLOEXEC", 0)
            self._fd = os.eventfd(0, flags)
            # Closes the fd if the association is dropped without its DUL ever running
            self._release = weakref.finalize(self, os.close, self._fd)
        else:  # pragma: no cover - non-Linux
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._pair = (reader, writer)
            self._fd = reader.fileno()
            self._release = weakref.finalize(self, _close_all, reader, writer)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self) -> None:
        if self._pending:  # a wake-up is already on its way to the reader
            return
        with self._lock:
            if self._closed or self._pending:
                return
            self._pending = True
            try:
                if self._pair is None:
                    os.eventfd_write(self._fd, 1)
                else:  # pragma: no cover - non-Linux
                    self._pair[1].send(b"\0")
            except OSError:  # full (cannot happen for eventfd) or closed: already awake
                pass

    def drain(self) -> None:
        # Read, then clear the flag, both under the lock that wake() writes under.
        # Clearing first would lose a wake-up: a wake() between the clear and the read
        # writes again, the read consumes both writes, and the flag stays set with
        # nothing to read, so every later wake() is skipped and the reactor falls
        # back to its 50 ms timeout. A wake() that finds the flag still set here
        # needs no write: its item was queued before, and the reactor looks at the
        # queues after draining.
        with self._lock:
            if self._closed:
                return
            try:
                if self._pair is None:
                    os.eventfd_read(self._fd)
                else:  # pragma: no cover - non-Linux
                    while self._pair[0].recv(4096):
                        pass
            except OSError:  # BlockingIOError: nothing (more) to read
                pass
            self._pending = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._release()  # runs at most once


def _close_all(*sockets: socket.socket) -> None:  # pragma: no cover - non-Linux
    for sock in sockets:
        sock.close()


class _SignallingQueue(queue.Queue):
    """A :class:`queue.Queue` that calls ``signal()`` after every ``put``."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class _SignallingEvent(threading.Event):
    """The association's pause checkpoint; changing it wakes the reactor.

    A caller that pauses the reactor clears the checkpoint and then spins until the
    reactor reports ``_is_paused``; the reactor only does that at the top of its loop,
    so it has to be woken rather than left to finish its wait.
    """

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def set(self) -> None:
        super().set()
        self._signal()

    def clear(self) -> None:
        super().clear()
        self._signal()


def _swap_queue(owner: Any, name: str, signal: Callable[[], None]) -> None:
    """Replace ``owner.<name>`` by a signalling queue holding the same items."""
    old = getattr(owner, name)
    new = _SignallingQueue(signal)
    while True:
        try:
            new.put_nowait(old.get_nowait())
        except queue.Empty:
            break
    setattr(owner, name, new)


class _State:
    """What :func:`speed_up` attaches to one association."""

    def __init__(self) -> None:
        self.dul_waker = _FdWaker()
        self.assoc_wake = threading.Event()
        self.poller: Any = select.poll() if hasattr(select, "poll") else None
        if self.poller is not None:
            self.poller.register(self.dul_waker.fileno(), select.POLLIN)
        self.polled_fd = -1  # the TCP socket's fd currently registered with poller
        self.raw_socket: socket.socket | None = None  # for TCP_QUICKACK, where Linux has it
        self.dul_target: Callable[[], None] | None = None


# --------------------------------------------------------------------------------------
# DUL thread


def _dul_wait(dul: Any, state: _State) -> None:
    """Block until the socket is readable, the DUL is woken, or DUL_MAX_WAIT passes."""
    # Work that arrives without going through the wake-up fd
    if dul.event_queue.qsize() or dul.to_provider_queue.qsize():
        return

    transport = dul.socket
    raw = None
    if transport is not None and getattr(transport, "_is_connected", True):
        raw = transport.socket
    if raw is not None and isinstance(raw, _SSLSocket):
        try:
            if raw.pending():  # decrypted bytes that poll/select cannot see
                return
        except (OSError, ValueError):
            return

    fd = -1
    if raw is not None:
        try:
            fd = raw.fileno()
        except (OSError, ValueError):
            fd = -1

    waker = state.dul_waker
    try:
        if state.poller is not None:
            if fd != state.polled_fd:
                _unwatch_socket(state)
                if fd >= 0:
                    state.poller.register(fd, select.POLLIN | select.POLLPRI)
                    state.polled_fd = fd
            ready = state.poller.poll(DUL_MAX_WAIT * 1000.0)
            for ready_fd, mask in ready:
                if ready_fd == waker.fileno():
                    waker.drain()
                elif mask & select.POLLNVAL:
                    # Closed under us; the next pass notices it on the transport
                    # side. Sleep like stock pynetdicom so this can never spin.
                    _unwatch_socket(state)
                    time.sleep(0.001)
        else:  # pragma: no cover - platforms without poll()
            watched: list[Any] = [waker.fileno()] + ([raw] if fd >= 0 else [])
            readable, _, _ = select.select(watched, [], [], DUL_MAX_WAIT)
            if waker.fileno() in readable:
                waker.drain()
    except (OSError, ValueError):
        # The socket was closed or replaced while we looked at it; the transport
        # check of the next pass reports it. Never spin faster than stock.
        _unwatch_socket(state)
        time.sleep(0.001)


def _unwatch_socket(state: _State) -> None:
    if state.poller is not None and state.polled_fd >= 0:
        try:
            state.poller.unregister(state.polled_fd)
        except (KeyError, OSError, ValueError):
            pass
    state.polled_fd = -1


def _ack_at_once(state: _State) -> None:
    """Ask Linux to acknowledge what we read next without delay (TCP_QUICKACK).

    A sender with Nagle's algorithm on holds its next small segment until our ACK
    arrives; a delayed ACK (up to 40 ms, or 200 ms elsewhere) then stalls every small
    message. The flag does not stick, so it is set again before every read.
    """
    if state.raw_socket is not None:
        try:
            state.raw_socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:  # closed, or not TCP: nothing to speed up
            state.raw_socket = None


def _dul_reactor(self: Any) -> None:
    """Replacement for ``DULServiceProvider.run_reactor`` (bound to one instance).

    Same steps, in the same order, as pynetdicom's loop; only the idle sleep became
    :func:`_dul_wait`.
    """
    state: _State = getattr(self.assoc, _MARKER)
    self._idle_timer.start()
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                # Release the association thread, which waits for us to run
                self.assoc._dul_ready.set()
                idle = True

            if idle:
                _dul_wait(self, state)

            if self._kill_thread:
                break

            # ARTIM first, so its event is queued ahead of this pass's other events
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                # One pass either hands a local primitive to the state machine or
                # reads one PDU from the peer, never both
                if self._process_recv_primitive():
                    pass
                else:
                    _ack_at_once(state)
                    if self._is_transport_event():
                        self._idle_timer.restart()
            except Exception as exc:
                _LOG_DUL.error("Exception in DUL.run(), aborting association")
                _LOG_DUL.exception(exc)
                _abort_after_exception(self)
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue

            self.state_machine.do_action(event)
            idle = False
    finally:
        state.dul_waker.close()
        # The association thread checks dul.is_alive(); let it look again now
        state.assoc_wake.set()


def _abort_after_exception(self: Any) -> None:
    """What stock pynetdicom does when its DUL loop raises: send an A-ABORT PDU
    directly (the state machine may be in an inconsistent state) and stop both
    reactors."""
    from pynetdicom.pdu import A_ABORT_RQ

    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    if self.socket is not None:
        self.socket.send(abort_pdu.encode())
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    self.assoc._kill = True
    self._kill_thread = True


def _dul_thread_run(self: Any) -> None:
    """Replacement for ``dul.run``: what :class:`threading.Thread` executes."""
    state: _State = getattr(self.assoc, _MARKER)
    target = state.dul_target
    state.dul_target = None  # like Thread.run, drop the reference once used
    if target is not None:
        target()


def _wrap_waking(original: Callable[..., Any], waker: Callable[[], None]) -> Callable:
    """``original`` followed by ``waker()``, wake-up also attempted on failure."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            waker()

    wrapper.__name__ = getattr(original, "__name__", "wrapper")
    wrapper.__doc__ = getattr(original, "__doc__", None)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def _make_stop_dul(dul: Any, original: Callable[[], bool], state: _State) -> Callable:
    """``dul.stop_dul`` that wakes the DUL thread so it sees the kill flag at once."""

    def stop_dul() -> bool:
        if dul.state_machine.current_state == "Sta1":
            # Same condition the original tests before it sets the flag; setting it
            # first lets the woken thread see it
            dul._kill_thread = True
            state.dul_waker.wake()
        return original()

    stop_dul.__doc__ = original.__doc__
    stop_dul.__wrapped__ = original  # type: ignore[attr-defined]
    return stop_dul


# --------------------------------------------------------------------------------------
# Association thread


def _assoc_reactor(self: Any) -> None:
    """Replacement for ``Association._run_reactor`` (bound to one instance).

    Same checks, in the same order, as pynetdicom's acceptor loop. Two differences:
    the 1 ms sleep at the top became a wait on the association's wake-up event, and
    leaving the pause checkpoint is re-checked (see below).
    """
    state: _State = getattr(self, _MARKER)
    wake = state.assoc_wake
    self._is_paused = False
    while not self._kill:
        # A message still queued (one is taken per pass) means no waiting at all
        if self.dimse.msg_queue.empty():
            wake.wait(ASSOC_MAX_WAIT)
        # Clear before looking, so anything that arrives from here on sets it again
        wake.clear()

        # Callers of send_*() / release() pause the reactor so it does not take their
        # responses off the queue: they clear the checkpoint, then wait for
        # _is_paused. Re-checking the checkpoint after leaving the pause closes a
        # window the stock loop has: a caller that clears it just after wait()
        # returned still reads _is_paused as True and goes ahead while the loop
        # carries on to get_msg() and can take the caller's response.
        while True:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._reactor_checkpoint.is_set():
                break

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        # A-RELEASE-RQ from the peer
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _LOG_ASSOC.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        # A-ABORT / A-P-ABORT, from the peer or the local DUL
        if self.acse.is_aborted():
            message = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                message += " (A-P-ABORT)"
            _LOG_ASSOC.info(message)
            # Take the primitive off so EVT_ACSE_RECV handlers still run
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        # Network (idle) timeout
        if self.dul.idle_timer_expired():
            _LOG_ASSOC.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


# --------------------------------------------------------------------------------------
# Reading from the socket

#: Most bytes :func:`_make_recv`'s ``recv`` asks the socket for at once.
RECV_BLOCK = 1 << 20


def _make_recv(transport: Any) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` for one association, reading in large blocks.

    pynetdicom's reads a PDU 4 KiB at a time: 64 system calls (and as many releases
    and re-acquisitions of the GIL) for one 256 KiB P-DATA-TF. This one asks for what
    is still missing, up to :data:`RECV_BLOCK`, so it takes what the socket holds at
    once. The result grows with the bytes that arrived, never with the length the
    peer announced, and, as in the original, a closed connection returns what was
    read so far and socket errors are raised to the caller."""

    def recv(nr_bytes: int) -> bytearray:
        sock = transport.socket
        stream = bytearray()
        while len(stream) < nr_bytes:
            block = sock.recv(min(nr_bytes - len(stream), RECV_BLOCK))
            if not block:
                break
            stream += block
        return stream

    recv.__wrapped__ = transport.recv  # type: ignore[attr-defined]
    return recv


# --------------------------------------------------------------------------------------
# Public API


def is_sped_up(assoc: Any) -> bool:
    """Return ``True`` if :func:`speed_up` has been applied to `assoc`."""
    return _MARKER in getattr(assoc, "__dict__", {})


def speed_up(assoc: Any) -> None:
    """Replace the fixed-sleep waits of one acceptor association by event-driven ones.

    Call it from an ``evt.EVT_CONN_OPEN`` handler on the acceptor side, i.e. after
    pynetdicom created the :class:`~pynetdicom.association.Association` and before it
    started the association's thread. Calling it again on the same association does
    nothing.

    Raises
    ------
    RuntimeError
        If the association is not an acceptor, or its association or DUL thread has
        already been started (the loops can only be replaced before they run).
    """
    if is_sped_up(assoc):
        return
    if not assoc.is_acceptor:
        raise RuntimeError("tuning.speed_up() only supports acceptor associations")
    dul = assoc.dul
    if assoc.ident is not None or dul.ident is not None:
        raise RuntimeError(
            "tuning.speed_up() must run before the association is started "
            "(bind it to evt.EVT_CONN_OPEN on the server)"
        )

    from pynetdicom.utils import make_target

    state = _State()
    setattr(assoc, _MARKER, state)
    raw = getattr(dul.socket, "socket", None)
    if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
        # Our responses are small and each one is awaited by the peer: never hold them.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None:
            state.raw_socket = raw
    wake_dul = state.dul_waker.wake
    wake_assoc = state.assoc_wake.set

    # Queues: anything put for the DUL wakes the DUL, anything put for the association
    # thread wakes the association thread
    _swap_queue(dul, "to_provider_queue", wake_dul)
    _swap_queue(dul, "to_user_queue", wake_assoc)
    _swap_queue(assoc.dimse, "msg_queue", wake_assoc)

    checkpoint = _SignallingEvent(wake_assoc)
    if assoc._reactor_checkpoint.is_set():
        threading.Event.set(checkpoint)
    assoc._reactor_checkpoint = checkpoint

    # DUL thread. Thread.__init__ captured the bound original run_reactor as its
    # target, so overriding run_reactor alone would not change what the thread runs;
    # run() is what Thread calls, so override that too. make_target() copies the
    # contextvars of this (the connection's) thread when pynetdicom is configured to.
    dul.run_reactor = types.MethodType(_dul_reactor, dul)
    state.dul_target = make_target(dul.run_reactor)
    dul.run = types.MethodType(_dul_thread_run, dul)
    dul.stop_dul = _make_stop_dul(dul, dul.stop_dul, state)
    dul.kill_dul = _wrap_waking(dul.kill_dul, wake_dul)

    # Reading PDUs: in blocks as large as the socket has, not 4 KiB at a time
    if dul.socket is not None:
        dul.socket.recv = _make_recv(dul.socket)

    # Association thread: run_reactor() looks _run_reactor up on the instance each time
    assoc._run_reactor = types.MethodType(_assoc_reactor, assoc)
    assoc.kill = _wrap_waking(assoc.kill, wake_assoc)


# --------------------------------------------------------------------------------------
# Received data sets streamed to disk

#: Name prefix of the files pynetdicom streams received data sets into.
SPOOL_PREFIX = "incoming-"
#: Permissions of a spool file (those of ``tempfile.mkstemp``, which made them before).
SPOOL_MODE = 0o600
_stock_temporary_file = tempfile.NamedTemporaryFile
_spooling: dict[Any, str] = {}  # association -> the spool file it is writing or wrote last
_spooling_lock = threading.Lock()
# Spool files being written or not yet closed, by name: their SHA-256 so far
_spool_files: weakref.WeakValueDictionary[str, _SpoolFile] = weakref.WeakValueDictionary()
_spool_names = itertools.count()
_spool_tag = f"{os.getpid()}-{secrets.token_hex(4)}"
# What pynetdicom's dimse_messages used before spool_received_datasets() changed them
_stock_file_meta: dict[str, Any] = {}


#: Written bytes of a spool file are handed to the disk in the background once at
#: least this many are waiting (``write_back``).
WRITE_BACK_FROM = 64 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)``: start
    writing a range of a file to disk without waiting for it; None elsewhere."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux/glibc
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_write_back(fd: int, offset: int, count: int) -> None:
        function(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored

    return start_write_back


_start_write_back = _load_sync_file_range()


class _SpoolFile:
    """The file pynetdicom streams one received data set into.

    It offers what pynetdicom uses of a ``NamedTemporaryFile``: ``name``, ``write``,
    ``file.flush()`` and ``close``; and it hashes (SHA-256) and counts every byte as
    it is written, so that :func:`received_digest` knows the file's digest once the
    last fragment is in, without reading the file again. Writes go through one
    ``BufferedWriter``: the small ones (preamble, file meta) are gathered, the large
    ones (each PDV's fragment) are written straight through.
    """

    def __init__(self, folder: Path, write_back: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            name = os.path.join(folder, f"{SPOOL_PREFIX}{_spool_tag}-{next(_spool_names)}.dcm")
            try:
                fd = os.open(name, flags, SPOOL_MODE)
                break
            except FileExistsError:  # left by an earlier process with the same pid
                continue
        self.name = name
        self._out = open(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self._write_back = write_back and _start_write_back is not None
        self._handed_to_disk = 0  # bytes already given to start_write_back

    @property
    def file(self) -> _SpoolFile:  # pynetdicom flushes ``spool.file``
        return self

    @property
    def closed(self) -> bool:
        return self._out.closed

    def write(self, data: Any) -> int:
        written = self._out.write(data)
        self._hash.update(data)
        self.size += written
        return written

    def flush(self) -> None:
        self._out.flush()
        # pynetdicom flushes after every fragment: while the next one arrives, the
        # disk can already be writing this one, and the fdatasync that the store
        # makes before it answers has less left to wait for.
        if self._write_back and self.size - self._handed_to_disk >= WRITE_BACK_FROM:
            _start_write_back(self._out.fileno(), self._handed_to_disk,  # type: ignore[misc]
                              self.size - self._handed_to_disk)
            self._handed_to_disk = self.size

    def close(self) -> None:
        self._out.close()

    def digest(self) -> tuple[int, str]:
        """(size, SHA-256 as hex) of everything written so far."""
        return self.size, self._hash.hexdigest()


def received_digest(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(size, SHA-256 hex digest) of the spool file ``path`` as pynetdicom wrote it,
    or None when ``path`` is not a spool file this process is still holding.

    Call it from the C-STORE handler: by then the whole data set is in the file."""
    spool = _spool_files.get(os.fspath(path))
    if spool is None or spool.closed:
        return None
    spool.flush()
    return spool.digest()


def spool_received_datasets(folder: Path | None, write_back: bool = False) -> None:
    """Make pynetdicom stream every received C-STORE data set into a file in ``folder``
    (on the filesystem where it will be kept, so that it can be renamed into place),
    or back into memory when ``folder`` is None.

    pynetdicom has this mode (``_config.STORE_RECV_CHUNKED_DATASET``) but creates the
    files in the system's temporary folder; the module's ``NamedTemporaryFile`` is
    replaced by one that writes a :class:`_SpoolFile` into ``folder`` and remembers,
    per association, the file being written, so that :func:`discard_partial_dataset`
    can remove what an abort left behind. The file meta group pynetdicom writes first
    is encoded by :func:`encode_file_meta` (the same bytes as pydicom's encoding of
    pynetdicom's ``create_file_meta``, at a fraction of the cost). With ``write_back``
    (for a server that flushes each file before it answers) the disk is asked to
    start writing each fragment as soon as it is in the file (Linux only). These
    settings are process-wide: one gateway per process.
    """
    from pynetdicom import _config, dimse_messages

    if not _stock_file_meta:
        _stock_file_meta.update(
            create_file_meta=dimse_messages.create_file_meta,
            write_file_meta_info=dimse_messages.write_file_meta_info)

    if folder is None:
        _config.STORE_RECV_CHUNKED_DATASET = False
        dimse_messages.NamedTemporaryFile = _stock_temporary_file
        dimse_messages.create_file_meta = _stock_file_meta["create_file_meta"]
        dimse_messages.write_file_meta_info = _stock_file_meta["write_file_meta_info"]
        return

    def spool_file(*args: Any, **kwargs: Any) -> Any:
        handle = _SpoolFile(folder, write_back)
        _spool_files[handle.name] = handle
        # Data sets are decoded in the association's DUL thread, which knows its
        # association.
        owner = getattr(threading.current_thread(), "assoc", None)
        if owner is not None:
            with _spooling_lock:
                _spooling[owner] = handle.name
        return handle

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = spool_file
    dimse_messages.create_file_meta = _file_meta
    dimse_messages.write_file_meta_info = _write_file_meta


class _FileMeta(tuple):
    """What pynetdicom's ``create_file_meta`` was asked for, encoded when written."""


def _file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
               **kwargs: Any) -> Any:
    if kwargs:  # pynetdicom asked for something this encoder does not write
        return _stock_file_meta["create_file_meta"](
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax, **kwargs)
    return _FileMeta((str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax)))


def _write_file_meta(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(file_meta, _FileMeta) and not args and not kwargs:
        fp.write(encode_file_meta(*file_meta)[_PREAMBLE_LENGTH:])
        return
    _stock_file_meta["write_file_meta_info"](fp, file_meta, *args, **kwargs)


_PREAMBLE_LENGTH = 132
_PREAMBLE = b"\0" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(sop_class: str, sop_instance: str, transfer_syntax: str,
                     source_ae: str = "") -> bytes:
    """Preamble (zeros), ``DICM`` and the file meta group (Explicit VR Little Endian)
    of a received data set: version 00 01, the SOP Class and Instance UIDs, the
    transfer syntax, pynetdicom's implementation UID and version name, and Source
    Application Entity Title when ``source_ae`` is given.

    Without ``source_ae`` the bytes are those pydicom's ``write_file_meta_info`` writes
    for pynetdicom's ``create_file_meta`` of the same UIDs (a test checks it)."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01", b"\0"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace"), b"\0"),
        _meta_element(0x0003, b"UI", sop_instance.encode("ascii", "replace"), b"\0"),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace"), b"\0"),
        _meta_element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode(), b"\0"),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode()[:16], b" "),
        *([_meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" ")]
          if source_ae else []),
    ])
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + length + body


def discard_partial_dataset(assoc: Any) -> None:
    """Remove the data set file ``assoc`` was receiving when it ended, if still there.

    Call it once the association's thread is done: every complete data set has by
    then been handled (moved away, or deleted by pynetdicom), so what remains under
    the remembered name is a transfer that was cut off.
    """
    with _spooling_lock:
        name = _spooling.pop(assoc, None)
    if name is not None:
        try:
            os.unlink(name)
            log.info("removed the partly received data set %s", name)
        except FileNotFoundError:
            pass


def _version_tuple(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def _code_names(function: Any) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def check_compatible() -> None:
    """Check that the pynetdicom internals :func:`speed_up` relies on are as expected.

    Raises
    ------
    RuntimeError
        Naming every difference found: the pynetdicom version outside
        :data:`TESTED_RANGE`, or a missing class/instance attribute or method.
    """
    problems: list[str] = []
    try:
        import pynetdicom
        from pynetdicom import AE, transport
        from pynetdicom import utils as pyn_utils
        from pynetdicom.association import Association
        from pynetdicom.dimse import DIMSEServiceProvider
        from pynetdicom.dul import DULServiceProvider
        from pynetdicom.pdu import A_ABORT_RQ  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"dicomgate.tuning: cannot import pynetdicom internals: {exc}")

    version = str(getattr(pynetdicom, "__version__", "unknown"))
    parsed = _version_tuple(version)
    low, high = TESTED_RANGE
    if parsed is None or not low <= parsed < high:
        problems.append(
            f"pynetdicom {version} is outside the tested range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )

    def need_callable(owner: Any, owner_name: str, names: list[str]) -> None:
        for name in names:
            if not callable(getattr(owner, name, None)):
                problems.append(f"{owner_name}.{name}() is missing")

    need_callable(
        DULServiceProvider,
        "DULServiceProvider",
        ["run", "run_reactor", "_process_recv_primitive", "_is_transport_event",
         "idle_timer_expired", "receive_pdu", "stop_dul", "kill_dul"],
    )
    need_callable(
        Association,
        "Association",
        ["run_reactor", "_run_reactor", "_serve_request", "kill", "abort", "release"],
    )
    need_callable(DIMSEServiceProvider, "DIMSEServiceProvider", ["get_msg"])
    need_callable(transport.AssociationSocket, "AssociationSocket", ["recv"])
    # The fast recv is found on the instance: the DUL must read through socket.recv()
    if "recv" not in _code_names(getattr(DULServiceProvider, "_read_pdu_data", None)):
        problems.append("DULServiceProvider._read_pdu_data() no longer calls socket.recv()")
    need_callable(pyn_utils, "pynetdicom.utils", ["make_target"])
    for name in ("EVT_CONN_OPEN", "EVT_RELEASED", "EVT_ABORTED"):
        if not hasattr(evt, name):
            problems.append(f"pynetdicom.evt.{name} is missing")
    if not isinstance(getattr(transport.AssociationSocket, "ready", None), property):
        problems.append("AssociationSocket.ready is no longer a property")

    # The association thread must find _run_reactor on the instance at call time
    if "_run_reactor" not in _code_names(getattr(Association, "run_reactor", None)):
        problems.append("Association.run_reactor() no longer calls self._run_reactor()")
    # stop_dul must still stop the thread through the _kill_thread flag
    if "_kill_thread" not in _code_names(getattr(DULServiceProvider, "stop_dul", None)):
        problems.append("DULServiceProvider.stop_dul() no longer sets _kill_thread")
    # The server binds speed_up to EVT_CONN_OPEN, which must fire before start()
    handle_names = _code_names(getattr(transport.RequestHandler, "handle", None))
    if "EVT_CONN_OPEN" not in handle_names or "start" not in handle_names:
        problems.append("RequestHandler.handle() no longer fires EVT_CONN_OPEN before start()")

    # Instance attributes: build an acceptor association that is never started
    try:
        assoc = Association(AE(), "acceptor")
    except Exception as exc:  # pragma: no cover - only if pynetdicom changed a lot
        problems.append(f"cannot create an acceptor Association to inspect: {exc!r}")
    else:
        dul = getattr(assoc, "dul", None)
        dimse = getattr(assoc, "dimse", None)
        expected: list[tuple[Any, str, str, Any]] = [
            (assoc, "Association", "dul", DULServiceProvider),
            (assoc, "Association", "dimse", DIMSEServiceProvider),
            (assoc, "Association", "acse", None),
            (assoc, "Association", "_reactor_checkpoint", threading.Event),
            (assoc, "Association", "_dul_ready", threading.Event),
            (assoc, "Association", "_is_paused", bool),
            (assoc, "Association", "_kill", bool),
            (assoc, "Association", "network_timeout_response", str),
            (dul, "DULServiceProvider", "to_provider_queue", queue.Queue),
            (dul, "DULServiceProvider", "to_user_queue", queue.Queue),
            (dul, "DULServiceProvider", "event_queue", queue.Queue),
            (dul, "DULServiceProvider", "_kill_thread", bool),
            (dul, "DULServiceProvider", "_idle_timer", None),
            (dul, "DULServiceProvider", "artim_timer", None),
            (dul, "DULServiceProvider", "state_machine", None),
            (dul, "DULServiceProvider", "socket", None),
            (dimse, "DIMSEServiceProvider", "msg_queue", queue.Queue),
        ]
        for owner, owner_name, name, kind in expected:
            if owner is None or not hasattr(owner, name):
                problems.append(f"{owner_name} instances have no attribute {name!r}")
            elif kind is not None and not isinstance(getattr(owner, name), kind):
                problems.append(
                    f"{owner_name}.{name} is a {type(getattr(owner, name)).__name__}, "
                    f"expected {kind.__name__}"
                )
        if dul is not None:
            for timer in ("_idle_timer", "artim_timer"):
                obj = getattr(dul, timer, None)
                if obj is not None and not hasattr(obj, "expired"):
                    problems.append(f"DULServiceProvider.{timer} has no 'expired'")
            machine = getattr(dul, "state_machine", None)
            if machine is not None and not hasattr(machine, "current_state"):
                problems.append("StateMachine has no 'current_state'")
        acse = getattr(assoc, "acse", None)
        if acse is not None:
            need_callable(acse, "ACSE", ["is_release_requested", "is_aborted", "send_release"])

    # Streaming received data sets to files
    from pynetdicom import _config, dimse_messages

    if not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        problems.append("pynetdicom._config.STORE_RECV_CHUNKED_DATASET is missing")
    if getattr(dimse_messages, "NamedTemporaryFile", None) is None:
        problems.append("pynetdicom.dimse_messages no longer uses NamedTemporaryFile")
    # The spool file's file meta: decode_msg() must still write it with these two
    # module-level functions, called as spool_received_datasets() expects
    decode_names = _code_names(getattr(dimse_messages.DIMSEMessage, "decode_msg", None))
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        if name not in decode_names:
            problems.append(f"DIMSEMessage.decode_msg() no longer calls {name}()")
        elif not callable(getattr(dimse_messages, name, None)):
            problems.append(f"pynetdicom.dimse_messages.{name} is missing")
    import inspect

    try:
        create_parameters = inspect.signature(
            _stock_file_meta.get("create_file_meta", getattr(dimse_messages, "create_file_meta",
                                                              None))).parameters
    except (TypeError, ValueError):
        create_parameters = {}  # type: ignore[assignment]
    if not {"sop_class_uid", "sop_instance_uid", "transfer_syntax"} <= set(create_parameters):
        problems.append("pynetdicom's create_file_meta() no longer takes sop_class_uid, "
                        "sop_instance_uid and transfer_syntax")

    # AssociationSocket.__init__ sets _is_connected; check it without a real connection
    init_names = _code_names(getattr(transport.AssociationSocket, "__init__", None))
    if "_is_connected" not in init_names:
        problems.append("AssociationSocket no longer has an '_is_connected' attribute")

    if problems:
        raise RuntimeError(
            "dicomgate.tuning is not compatible with the installed pynetdicom: "
            + "; ".join(problems)
        )
