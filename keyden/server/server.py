"""The daemon: config -> Server -> startup / serve / shutdown.

Serving is the Reactor's (reactor.py): one epoll loop answers small
requests for every connection, worker threads take the slow ones.  The
Server owns the lifecycle around it: the state directory, the durable store,
hardening, the listening socket, admission (connection caps per uid and in
total) and garbage collection: a sweep every gc_interval, and a process's
keyrings the moment it exits (exits.py).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections import Counter
from typing import Callable

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core import trust
from keyden.core.store import KeyStore
from keyden.logs import Throttled
from keyden.persist import SealedJournal, open_durable
from keyden.errors import StartupError
from keyden.persist.files import make_dirs, require_safe_parents
from keyden.protocol.transport import SYSTEM_SOCKET
from keyden.server import harden, limits, peer
from keyden.server.audit import AuditLog
from keyden.server.config import ServerConfig
from keyden.server.connection import Connection
from keyden.server.exits import ExitWatcher
from keyden.server.handlers import MAX_PENDING_FDS
from keyden.server.handlers.dataplane import MAX_REGIONS
from keyden.server.reactor import Channel, Reactor
from keyden.tls import engine as tls_engine

log = logging.getLogger("keyden.server")

#: seconds a stop waits for the key database's close (its last write), however loaded the disk; and, once
#: something was already left running, for each step that may sit in a write that never returns (the exit
#: watcher's collection, that close)
JOURNAL_CLOSE_WAIT = 30.0
STUCK_STEP_WAIT = 2.0
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
FD_HEADROOM = 64  # descriptors besides connections' and sessions': the audit file, state files, the loop
#: What one connection may make us hold at most: its socket, descriptors sent ahead of their requests
#: (one per message), and each shared region's mapping (Python's mmap keeps a descriptor).
FDS_PER_CONNECTION = 1 + MAX_PENDING_FDS + MAX_REGIONS
FDS_PER_TLS_SESSION = 2  # the peer's socket and our end of the application's socketpair
#: Processes watched for their exit at once (a pidfd each), per max_connections: exits.py.
WATCHED_PER_CONNECTION = 1


def _unraisable_hook(throttled: Throttled):
    """ssl decodes a peer's SNI as ASCII before calling our callback, and reports a failure as an
    exception it cannot raise: a traceback on stderr per handshake, which any peer could repeat at will.
    Those become one throttled line naming no bytes; anything else is reported as Python would."""
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(unraisable.object, bytes):
            throttled.warning("a peer's TLS server name is not ASCII; its handshake is refused")
        else:
            sys.__unraisablehook__(unraisable)
    return hook


def _make_socket_dirs(directory: str) -> None:
    """The socket's directories, each made 0755 whatever the umask (any local process must reach it)."""
    try:
        make_dirs(directory, 0o755)
    except FileExistsError as exc:
        raise StartupError(f"cannot make the socket's directory {exc.filename}: it exists and is not a "
                           "directory") from None
    except OSError as exc:
        hint = " (give one you may write: serve --socket PATH, or set $KEYDEN_SOCKET or $XDG_RUNTIME_DIR)" \
            if isinstance(exc, PermissionError) else ""
        raise StartupError(f"cannot make the socket's directory {directory}: {exc.strerror}{hint}") from None


def _trust_file(path: str, what: str) -> tuple[str, bytes] | None:
    """A configured CA bundle or blacklist file, as trust.install_system_keyrings takes it; None if unset."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return path, f.read()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _unlink_if_ours(path: str, ours: tuple[int, int] | None) -> None:
    """Remove our socket at shutdown, but not another daemon's: someone may have removed ours and bound
    a new one at the same path since (a second daemon started after the first's socket was deleted)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ours:
            os.unlink(path)
    except OSError:
        pass


class Server:
    def __init__(self, config: ServerConfig | None = None, store: KeyStore | None = None):
        self.config = config or ServerConfig()
        self.store = store or KeyStore(self.config.store)
        self.listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self._stopping = threading.Event()
        self._active = 0  # open connections (the loop's thread counts them)
        self._per_uid: Counter[int] = Counter()
        self._refusals = Throttled(log)
        self._gc_failures = Throttled(log, 60.0)  # with a full disk, every sweep fails the same way
        self.audit: AuditLog | None = None
        self.reactor: Reactor | None = None
        self._threads: list[threading.Thread] = []
        self._shutdown_lock = threading.Lock()
        self.started = False  # run() got past startup: a failure from then on is in stopping
        self._shut_down = False
        self.left_running: list[str] = []  # what the stop did not wait for (shutdown), left to its threads
        self._reopen_pending = False  # a SIGHUP came before the loop was there
        self._stop_signalled = False  # SIGTERM/SIGINT came (set by the handler, lock-free)
        self.journal: SealedJournal | None = None
        self.exits: ExitWatcher | None = None

    # ------------------------------------------------------------- lifecycle

    def startup(self) -> None:
        """Open the store, listen, start the background threads.  On failure, what it opened is closed again
        (the key database's lock above all: a second start in this process would find it held)."""
        try:
            self._startup()
        except BaseException:
            self._undo_startup()
            raise

    def _undo_startup(self) -> None:
        """Close what a failed start opened, and nothing else: unlike shutdown, no engine shared with
        another server in this process is stopped, and a failure here never hides the start's own."""
        steps = (("exit watcher", lambda: self.exits.stop(), self.exits),
                 ("socket", self._close_listener, self.listener),
                 ("audit log", lambda: self.audit.close(), self.audit),
                 ("key database", lambda: self.journal.close(), self.journal))
        self.store.on_process_keyring = None
        for what, close, opened in steps:
            if opened is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing the %s after a failed start", what)
        self.exits = self.listener = self.audit = self.journal = None

    def _close_listener(self) -> None:
        _unlink_if_ours(self.config.socket, self._socket_id)  # while it is open: its inode is not reused
        self.listener.close()

    def _startup(self) -> None:
        cfg = self.config
        cfg.check()
        # The socket's path first: a mistake there (an unsafe or unmakeable directory, a daemon already there)
        # is said before a store is made.
        require_safe_parents(cfg.socket, "socket")  # (else its directory's other writers could take its place)
        _make_socket_dirs(os.path.dirname(cfg.socket))
        self._clear_stale_socket(cfg.socket)
        self._open_store()
        watched = cfg.max_connections * WATCHED_PER_CONNECTION  # processes the exit watcher may follow
        self._raise_fd_limit(watched)
        self.audit = AuditLog.open(cfg.audit, cfg.state_dir, cfg.audit_max_bytes)
        self._listen(cfg.socket)
        self._start_background(watched)
        log.info("keyden listening on %s", cfg.socket)

    def _open_store(self) -> None:
        """The persistent keys, then the system keyrings.  Before any key is made, so restored serials are
        free; refuses (StartupError) without the master key.  Hardened first: no core dump or ptrace may
        catch the master key or a key being decrypted."""
        cfg = self.config
        if cfg.harden:
            applied = harden.harden(cfg.lock_memory)
            log.info("hardening: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
        cfg.prepare_state_dir()
        self.journal = open_durable(cfg, self.store)
        trust.install_system_keyrings(self.store, _trust_file(cfg.ca_bundle, "CA bundle"),
                                      _trust_file(cfg.blacklist_file, "blacklist file"))

    def _raise_fd_limit(self, watched: int) -> None:
        """As many descriptors as the connection and TLS caps may hold, or a warning that they cannot."""
        cfg = self.config
        wanted = (cfg.max_connections * FDS_PER_CONNECTION + FDS_PER_TLS_SESSION * tls_engine.MAX_SESSIONS + watched
                  + FD_HEADROOM)
        fd_limit = descriptors.raise_fd_limit(wanted)
        if fd_limit < wanted:
            log.warning("descriptor limit %d is below the %d that max_connections %d and %d TLS sessions may "
                        "hold: raise it (ulimit -n, systemd LimitNOFILE)", fd_limit, wanted, cfg.max_connections,
                        tls_engine.MAX_SESSIONS)

    def _listen(self, path: str) -> None:
        self._clear_stale_socket(path)  # (again: one may have died since)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Made 0666 (any local process may connect; identity comes from SO_PEERCRED) by the umask, not by a
        # chmod of the path after the bind, which would follow whatever was renamed onto it since.  (Nothing
        # else makes files yet, so the process-wide umask is ours for the call.)
        umask = os.umask(0o111)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(umask)
        self.listener = sock
        st = os.lstat(path)
        self._socket_id = (st.st_dev, st.st_ino)  # shutdown removes this socket, not one bound there since
        sock.listen(512)
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if os.geteuid() == 0 and runtime and os.path.dirname(os.path.abspath(path)) == os.path.abspath(runtime):
            log.warning("listening on %s, in root's login-session directory: other users' clients look in "
                        "their own and in %s, so they will not find this daemon (serve --socket %s, or "
                        "unset XDG_RUNTIME_DIR, for a daemon of the whole machine)", path, SYSTEM_SOCKET,
                        SYSTEM_SOCKET)

    def _start_background(self, watched: int) -> None:
        """The exit watcher (process keyrings go when their process does) and the garbage collector."""
        self.exits = ExitWatcher(self._process_exited, watched, self.config.max_connections_per_uid)
        self.exits.start()
        self.store.on_process_keyring = self.exits.watch
        gc = threading.Thread(target=self._gc_loop, name="keyden-gc", daemon=True)
        gc.start()
        self._threads.append(gc)

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise StartupError(f"the socket path {path} is too long (a Unix socket's takes at most "
                               f"{MAX_SOCKET_PATH} bytes)")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"cannot use the socket path {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            try:
                os.unlink(path)  # nobody listening: a leftover from a crash
            except OSError as exc:
                raise StartupError(f"{path} is a socket nobody listens on, of uid {st.st_uid}, and it cannot be "
                                   f"removed ({exc.strerror}): remove it, or serve --socket elsewhere") from None
        else:
            raise StartupError(f"a daemon is already listening on {path} (its socket belongs to uid {st.st_uid})")
        finally:
            probe.close()

    def _on_stop_signal(self) -> None:
        """SIGTERM/SIGINT: takes no lock (a second signal may come while the first is handled, on the same
        thread): a flag, and the loop is woken; shutdown does the rest."""
        self._stop_signalled = True
        reactor = self.reactor
        if reactor is not None:
            reactor.stop()

    def _on_sighup(self) -> None:
        """The signal handler runs on the loop's thread, maybe inside an audit write holding the lock a
        reopen takes: it only asks the loop to reopen, between rounds."""
        reactor = self.reactor
        if reactor is None:
            self._reopen_pending = True  # serve_forever passes it on
        else:
            reactor.call_soon(self.reopen_logs)

    def reopen_logs(self) -> None:
        """SIGHUP: a rotated-away audit file is closed and its path opened anew (logrotate's postrotate)."""
        if self.audit is not None and self.audit.path:
            if self.audit.reopen():
                log.info("SIGHUP: audit log %s reopened", self.audit.path)
        else:
            log.info("SIGHUP: no audit file to reopen")

    def serve_forever(self) -> None:
        """Serve until request_stop or SIGTERM/SIGINT; returns with every connection closed."""
        assert self.listener is not None
        self.reactor = Reactor(self.config, self._admit, self.audit)
        if self._reopen_pending:
            self.reactor.call_soon(self.reopen_logs)
        if self._stopping.is_set() or self._stop_signalled:
            return
        self.reactor.run(self.listener)

    def request_stop(self) -> None:
        """Stop serving, from any thread (a signal handler uses _on_stop_signal); serve_forever then returns."""
        self._stopping.set()
        if self.reactor is not None:
            self.reactor.stop()

    def shutdown(self) -> None:
        """Stop serving, close every connection, remove the socket.  Idempotent.

        Nothing here waits for ever on a disk that does not answer: a step still blocked after its bound
        is left to its thread, and named in ``left_running`` (the process should then exit without it:
        cli/serve.py).  A key database whose close was left raises, as one that failed to close does.
        """
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
            self.request_stop()
            if self.listener is not None:
                self._close_listener()  # first: the socket goes even if a step below cannot finish
            if self.reactor is not None and self.reactor.abandoned:
                self.left_running.append(f"{self.reactor.abandoned} requests")
            tls_engine.stop()  # handshakes still running hear why, and are audited
            if self.exits is not None:
                self.store.on_process_keyring = None
                # before the journal closes: a collection under way flushes it (or is stuck in that write)
                if not self.exits.stop(STUCK_STEP_WAIT):
                    self.left_running.append("the process-exit watcher")
                    log.error("the process-exit watcher did not stop within %g s (its write to the key database "
                              "has not returned); stopping without it", STUCK_STEP_WAIT)
            if self.journal is not None:
                self._close_journal_within(STUCK_STEP_WAIT if self.left_running else JOURNAL_CLOSE_WAIT)
            log.info("keyden stopped")

    def _close_journal_within(self, seconds: float) -> None:
        """Close the key database (writing what changes are noted), unless that takes over ``seconds``: a
        write that does not return holds it.  SQLite keeps the file whole either way."""
        failure: list[BaseException] = []

        def close() -> None:
            try:
                self.journal.close()
            except BaseException as exc:  # carried to the caller, as if it had closed it itself
                failure.append(exc)
        closing = threading.Thread(target=close, name="keyden-journal-close", daemon=True)
        closing.start()
        closing.join(seconds)
        if closing.is_alive():
            self.left_running.append("the key database's close")
            raise E.EIO(f"the key database could not be closed within {seconds:g} s (a write under way has not "
                        f"returned; stopping without waiting for: {', '.join(self.left_running)}): changes not "
                        f"yet written are lost, as in a crash")
        if failure:
            raise failure[0]

    def run(self) -> None:
        """startup, serve until SIGTERM/SIGINT, shutdown.  SIGHUP reopens the audit file (logrotate)."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self._on_sighup())  # at once: start-up may be long
        sys.unraisablehook = _unraisable_hook(Throttled(log))
        self.startup()
        self.started = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._on_stop_signal())
        try:
            self.serve_forever()
        finally:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing left to reopen
            self.shutdown()

    # ------------------------------------------------------------ connections

    def _admit(self, sock: socket.socket) -> Channel | None:
        """A new connection: who it is, and whether the caps let it in (if not, an error frame says why)."""
        cfg = self.config
        if self._active >= cfg.max_connections:
            self._refusals.warning("%d connections open; refusing more", cfg.max_connections)
            limits.refuse(sock, E.ENFILE(f"keyden is at its limit of {cfg.max_connections} connections"),
                          peer.uid_of(sock))  # its close is on its sender's share (descriptors.NOBODY: unknown)
            return None
        try:
            who = peer.peer_of(sock)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # ours, not the peer's: it is told why
                self._refusals.warning("cannot tell who connected: %s; refusing the connection", exc.strerror)
                limits.refuse(sock, E.error_class(exc.errno)(f"keyden cannot take a connection now ({exc.strerror}"
                                                             "); try again later"), peer.uid_of(sock))
                return None
            # Its process is gone already.  Unread: its close may be the last of a descriptor sent on it.
            descriptors.release_socket(sock, peer.uid_of(sock))
            return None
        audit = self.audit.connection(who.pid, who.uid, who.gid, who.exe) if self.audit is not None else None
        refusal = None
        if self._per_uid[who.uid] >= cfg.max_connections_per_uid:
            self._refusals.warning("uid %d over its connection limit; refusing pid %d", who.uid, who.pid)
            refusal = E.EMFILE(f"uid {who.uid} has {cfg.max_connections_per_uid} connections open")
        elif who.uid in descriptors.backlogged:
            self._refusals.warning("uid %d has descriptors stuck in their close; refusing pid %d", who.uid, who.pid)
            refusal = limits.backlogged(who.uid)
        if refusal is not None:
            if audit is not None:
                audit.record(W.Op.HELLO, None, refusal.code)
                self.audit.flush()  # the line before the refusal, as before any reply
            limits.refuse(sock, refusal, who.uid)
            return None
        self._active += 1
        self._per_uid[who.uid] += 1

        def closed() -> None:
            self._active -= 1
            self._per_uid[who.uid] -= 1
        return Channel(sock, Connection(self.store, who, cfg.max_frame, audit), closed)

    def _gc_loop(self) -> None:
        """Every gc_interval: the backstop for process keyrings whose process was not watched (exits.py)."""
        while not self._stopping.wait(self.config.gc_interval):
            self._collect(lambda: self.store.collect(peer.process_alive))

    def _process_exited(self, process: tuple[int, int]) -> None:
        """On the ExitWatcher's thread: ``process`` (pid, start time) has exited; its keyrings go now."""
        self._collect(lambda: self.store.collect_process(process))

    def _collect(self, collect: Callable[[], int]) -> None:
        """One collection, then what it destroyed under persistent keyrings made durable.  A failure the
        daemon expects (the key database not written: ENOSPC, EIO) is one throttled line, without a
        traceback: a full disk must not add one per sweep, or per exit, to the log.  Only an unexpected
        fault gets a traceback."""
        try:
            n = collect()
            if n:
                log.debug("garbage-collected %d keys", n)
            if self.journal is not None:
                self.journal.flush()
        except E.KeydenError as exc:
            self._gc_failures.error("garbage collection failed: %s", exc)  # "ENOSPC: ..."
        except Exception:
            log.exception("garbage collection failed")
