"""The daemon: config -> Server -> startup / serve / shutdown.

Serving is the Reactor's (reactor.py): one epoll loop answers small
requests for every connection, worker threads take the slow ones.  The
Server owns the lifecycle around it: the state directory, the durable store,
hardening, the listening socket, admission (connection caps per uid and in
total) and garbage collection.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import threading
from collections import Counter

from keyden import errors as E
from keyden import protocol as W
from keyden.core import trust
from keyden.core.store import KeyStore
from keyden.persist import SealedJournal, open_durable
from keyden.server import harden, limits, peer
from keyden.server.audit import AuditLog
from keyden.server.config import ServerConfig
from keyden.server.connection import Connection
from keyden.server.reactor import Channel, Reactor

log = logging.getLogger("keyden.server")

FD_HEADROOM = 64  # descriptors besides connections: passed memfds, the audit file, state files


class Server:
    def __init__(self, config: ServerConfig | None = None, store: KeyStore | None = None):
        self.config = config or ServerConfig()
        self.store = store or KeyStore(self.config.store)
        self.listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._active = 0  # open connections (the loop's thread counts them)
        self._per_uid: Counter[int] = Counter()
        self._refusals = limits.Throttled(log)
        self.audit: AuditLog | None = None
        self.reactor: Reactor | None = None
        self._threads: list[threading.Thread] = []
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        self.journal: SealedJournal | None = None

    # ------------------------------------------------------------- lifecycle

    def startup(self) -> None:
        cfg = self.config
        cfg.check()
        cfg.prepare_state_dir()
        # Before any key is made, so restored serials are free; refuses (StartupError) without the master key.
        self.journal = open_durable(cfg, self.store)
        if cfg.harden:
            applied = harden.harden(cfg.lock_memory)
            log.info("hardening: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
        trust.install_system_keyrings(self.store, cfg)
        path = cfg.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self._clear_stale_socket(path)
        fd_limit = limits.raise_fd_limit(cfg.max_connections + FD_HEADROOM)
        if fd_limit < cfg.max_connections + FD_HEADROOM:
            log.warning("descriptor limit %d is below max_connections %d + %d", fd_limit, cfg.max_connections,
                        FD_HEADROOM)
        self.audit = AuditLog.open(cfg.audit, cfg.state_dir, cfg.audit_max_bytes)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666)  # any local process may connect; identity comes from SO_PEERCRED
        sock.listen(512)
        self.listener = sock
        gc = threading.Thread(target=self._gc_loop, name="keyden-gc", daemon=True)
        gc.start()
        self._threads.append(gc)
        log.info("keyden listening on %s", path)

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listening: a leftover from a crash
        else:
            raise OSError(errno.EADDRINUSE, f"a daemon is already listening on {path}")
        finally:
            probe.close()

    def serve_forever(self) -> None:
        """Serve until request_stop (a signal handler may call it); returns with every connection closed."""
        assert self.listener is not None
        self.reactor = Reactor(self.config, self._admit, self.audit)
        if self._stopping.is_set():
            return
        self.reactor.run(self.listener)

    def request_stop(self) -> None:
        """Stop serving: safe from a signal handler; serve_forever then returns."""
        self._stopping.set()
        if self.reactor is not None:
            self.reactor.stop()

    def shutdown(self) -> None:
        """Stop serving, close every connection, remove the socket.  Idempotent."""
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
            self.request_stop()
            if self.listener is not None:
                self.listener.close()
                try:
                    os.unlink(self.config.socket)
                except OSError:
                    pass
            if self.journal is not None:
                self.journal.close()
            log.info("keyden stopped")

    def run(self) -> None:
        """startup, serve until SIGTERM/SIGINT, shutdown."""
        self.startup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())
        try:
            self.serve_forever()
        finally:
            self.shutdown()

    # ------------------------------------------------------------ connections

    def _admit(self, sock: socket.socket) -> Channel | None:
        """A new connection: who it is, and whether the caps let it in (if not, an error frame says why)."""
        cfg = self.config
        if self._active >= cfg.max_connections:
            self._refusals.warning("%d connections open; refusing more", cfg.max_connections)
            limits.refuse(sock, E.ENFILE(f"keyden is at its limit of {cfg.max_connections} connections"))
            return None
        try:
            who = peer.peer_of(sock)
        except OSError:
            sock.close()
            return None
        audit = self.audit.connection(who.pid, who.uid, who.gid, who.exe) if self.audit is not None else None
        if self._per_uid[who.uid] >= cfg.max_connections_per_uid:
            self._refusals.warning("uid %d over its connection limit; refusing pid %d", who.uid, who.pid)
            if audit is not None:
                audit.record(W.Op.HELLO, None, E.EMFILE.code)
                self.audit.flush()  # the line before the refusal, as before any reply
            limits.refuse(sock, E.EMFILE(f"uid {who.uid} has {cfg.max_connections_per_uid} connections open"))
            return None
        self._active += 1
        self._per_uid[who.uid] += 1

        def closed() -> None:
            self._active -= 1
            self._per_uid[who.uid] -= 1
        return Channel(sock, Connection(self.store, who, cfg.max_frame, audit), closed)

    def _gc_loop(self) -> None:
        while not self._stopping.wait(self.config.gc_interval):
            try:
                n = self.store.collect(peer.process_alive)
                if n:
                    log.debug("garbage-collected %d keys", n)
                if self.journal is not None:
                    self.journal.flush()  # what collection destroyed under persistent keyrings
            except Exception:
                log.exception("garbage collection failed")
