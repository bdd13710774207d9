"""The daemon: config -> Server -> startup / serve / shutdown.

Thread per connection with blocking sockets: measured faster per request
than asyncio streams, and a slow or silent client only ever occupies its
own thread.  Some of pyca's work releases the GIL (RSA signing, bulk
AES-GCM), so those connections run in parallel on separate cores; Ed25519
signing and the per-request Python do not (see bench/README.md).
"""

from __future__ import annotations

import array
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

log = logging.getLogger("keyden.server")

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_CHUNK = 1024 * 1024  # reads while a large frame is arriving
SMALL_RECV_CHUNK = 64 * 1024  # reads otherwise: an idle connection should not pin a megabyte
FD_HEADROOM = 64  # descriptors besides connections: passed memfds, the audit file, state files


ANCILLARY_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize * 4)


def _passed_fds(ancdata) -> list[int]:
    """Descriptors that came with a message (SCM_RIGHTS); anything else is ignored."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _send(sock: socket.socket, data: bytes, conn: Connection) -> None:
    """Write replies; descriptors a handler passes back (TLS_*) ride on their first byte, then are closed here."""
    out_fds = conn.context.out_fds if conn.context is not None else None
    if not out_fds:
        sock.sendall(data)
        return
    fds = out_fds[:]
    out_fds.clear()
    try:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    finally:
        for fd in fds:
            os.close(fd)


class Server:
    def __init__(self, config: ServerConfig | None = None, store: KeyStore | None = None):
        self.config = config or ServerConfig()
        self.store = store or KeyStore(self.config.store)
        self.listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._active = 0  # admitted connections, counted before their thread starts
        self._per_uid: Counter[int] = Counter()
        self._refusals = limits.Throttled(log)
        self.audit: AuditLog | None = None
        self._conn_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        self.journal: SealedJournal | None = None

    # ------------------------------------------------------------- lifecycle

    def startup(self) -> None:
        cfg = self.config
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
        threading.stack_size(512 * 1024)
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
        assert self.listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    break
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refusals.warning("accept failed: %s", exc.strerror)
                    self._stopping.wait(0.05)  # the error repeats until a connection closes: do not spin
                continue
            with self._conn_lock:
                admitted = self._active < self.config.max_connections
                if admitted:
                    self._active += 1
            if not admitted:
                self._refusals.warning("%d connections open; refusing more", self.config.max_connections)
                limits.refuse(conn, E.ENFILE(f"keyden is at its limit of {self.config.max_connections} connections"))
                continue
            try:
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep serving the rest
                with self._conn_lock:
                    self._active -= 1
                self._refusals.warning("cannot start a connection thread; refusing")
                limits.refuse(conn, E.EAGAIN("keyden cannot take another connection now"))

    def request_stop(self) -> None:
        """Stop accepting: safe from a signal handler; the serving thread then shuts down."""
        self._stopping.set()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass

    def shutdown(self) -> None:
        """Stop accepting, close every connection, remove the socket.  Idempotent."""
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
            with self._conn_lock:
                for c in list(self._conns):
                    try:
                        c.shutdown(socket.SHUT_RDWR)
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

    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            self._serve_admitted(sock)
        finally:
            with self._conn_lock:
                self._active -= 1

    def _serve_admitted(self, sock: socket.socket) -> None:
        try:
            who = peer.peer_of(sock)
        except OSError:
            sock.close()
            return
        audit = self.audit.connection(who.pid, who.uid, who.gid) if self.audit is not None else None
        with self._conn_lock:
            refuse = self._per_uid[who.uid] >= self.config.max_connections_per_uid
            if not refuse:
                self._per_uid[who.uid] += 1
                self._conns.add(sock)
        if refuse:
            self._refusals.warning("uid %d over its connection limit; refusing pid %d", who.uid, who.pid)
            if audit is not None:
                audit.record(W.Op.HELLO, None, E.EMFILE.code)
            limits.refuse(sock, E.EMFILE(f"uid {who.uid} has {self.config.max_connections_per_uid} connections open"))
            return
        conn = Connection(self.store, who, self.config.max_frame, audit)
        try:
            self._pump(sock, conn)
        except OSError:
            pass
        except Exception:
            log.exception("connection from pid %d failed", who.pid)
        finally:
            conn.close()
            with self._conn_lock:
                self._conns.discard(sock)
                self._per_uid[who.uid] -= 1
            sock.close()

    def _pump(self, sock: socket.socket, conn: Connection) -> None:
        """Read, answer, write, until the peer leaves.

        Memory per connection stays bounded: at most ``max_in_flight`` replies
        (or MAX_UNSENT bytes of them) wait before they are written, and while
        a write blocks on a peer that does not read, nothing more is read.
        """
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        cfg = self.config
        limits.set_timeouts(sock, receive=cfg.handshake_timeout, send=cfg.send_timeout)
        greeted = False
        max_in_flight = cfg.max_in_flight
        small = memoryview(bytearray(SMALL_RECV_CHUNK))
        large: memoryview | None = None
        while not conn.closed:
            view = small
            if conn.decoder.needed() > SMALL_RECV_CHUNK:
                view = large = large or memoryview(bytearray(RECV_CHUNK))
            try:
                n, ancdata, _flags, _addr = sock.recvmsg_into([view], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:  # SO_RCVTIMEO: silent for too long
                limits.refuse(sock, E.ETIMEDOUT(f"idle for {cfg.idle_timeout:g} s" if greeted else
                                                f"no HELLO within {cfg.handshake_timeout:g} s"))
                return
            fds = _passed_fds(ancdata) if ancdata else None
            if n == 0:
                for fd in fds or ():
                    os.close(fd)
                return
            unsent: list[bytes] = []
            size = 0
            for reply in conn.answers(view[:n], fds):
                unsent.append(reply)
                size += len(reply)
                if len(unsent) >= max_in_flight or size >= limits.MAX_UNSENT:
                    _send(sock, b"".join(unsent), conn)
                    unsent.clear()
                    size = 0
            if unsent:
                _send(sock, b"".join(unsent), conn)
            if not greeted and conn.context is not None:  # past HELLO: now only idle_timeout applies
                greeted = True
                limits.set_timeouts(sock, receive=cfg.idle_timeout)

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
