"""The daemon: config -> Server -> startup / serve / shutdown.

Thread per connection with blocking sockets: measured faster per request
than asyncio streams, and a slow or silent client only ever occupies its
own thread.  Crypto in pyca releases the GIL, so connections run in
parallel on separate cores where the work allows.
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

from keyden import protocol as W
from keyden.core.store import KeyStore
from keyden.server import harden, peer
from keyden.server.config import ServerConfig
from keyden.server.connection import Connection

log = logging.getLogger("keyden.server")

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_CHUNK = 1024 * 1024


ANCILLARY_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize * 4)


def _passed_fds(ancdata) -> list[int]:
    """Descriptors that came with a message (SCM_RIGHTS); anything else is ignored."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class Server:
    def __init__(self, config: ServerConfig | None = None, store: KeyStore | None = None):
        self.config = config or ServerConfig()
        self.store = store or KeyStore(self.config.store)
        self.listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._per_uid: Counter[int] = Counter()
        self._conn_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown_lock = threading.Lock()
        self._shut_down = False

    # ------------------------------------------------------------- lifecycle

    def startup(self) -> None:
        cfg = self.config
        cfg.prepare_state_dir()
        if cfg.harden:
            applied = harden.harden(cfg.lock_memory)
            log.info("hardening: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
        path = cfg.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self._clear_stale_socket(path)
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
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            t = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
            t.start()

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
            who = peer.peer_of(sock)
        except OSError:
            sock.close()
            return
        with self._conn_lock:
            if self._per_uid[who.uid] >= self.config.max_connections_per_uid:
                refuse = True
            else:
                refuse = False
                self._per_uid[who.uid] += 1
                self._conns.add(sock)
        if refuse:
            log.warning("uid %d over its connection limit; refusing pid %d", who.uid, who.pid)
            sock.close()
            return
        conn = Connection(self.store, who, self.config.max_frame)
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
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        if self.config.idle_timeout:
            sock.settimeout(self.config.idle_timeout)
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        while not conn.closed:
            try:
                n, ancdata, _flags, _addr = sock.recvmsg_into([view], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                return
            fds = _passed_fds(ancdata) if ancdata else None
            if n == 0:
                for fd in fds or ():
                    os.close(fd)
                return
            out = conn.receive(view[:n], fds)
            if out:
                sock.sendall(out)

    def _gc_loop(self) -> None:
        while not self._stopping.wait(self.config.gc_interval):
            try:
                n = self.store.collect(peer.process_alive)
                if n:
                    log.debug("garbage-collected %d keys", n)
            except Exception:
                log.exception("garbage collection failed")
