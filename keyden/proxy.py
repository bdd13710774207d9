"""The TLS-terminating proxy behind `keyden tls-proxy`: a sidecar whose keys never leave keyden.

It does stunnel's or ghostunnel's job without a key file on disk: each TCP
connection accepted on ``--listen`` goes to keyden with ``tls_accept`` (the
certificate chosen by SNI among those in ``--keyring``; client certificates
checked against ``--client-trust``), and the plaintext socket keyden hands
back is spliced to ``--forward`` (``HOST:PORT`` or ``unix:/path``).  One
thread per connection: a slow peer holds only its own thread, its handshake
bounded by ``--handshake-timeout``; past ``--max-connections`` new
connections are closed at once.  With ``--proxy-protocol`` each upstream
connection begins with a PROXY protocol version 2 header (HAProxy's
doc/proxy-protocol.txt) telling the backend who the client was and what
the handshake settled.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import signal
import socket
import struct
import sys
import threading
import time
from typing import Callable

from keyden import descriptors
from keyden import errors as E
from keyden.client import tls as client_tls
from keyden.hosts import host_of

CHUNK = 64 * 1024
CLOSE_TIMEOUT = 10.0  # default seconds the other side has to finish and close once one side closed (splice)
MAX_CLOSE_TIMEOUT = 3600.0
MAX_PER_HOST = 32  # connections one client address holds at once: an eighth of the default 256
MAX_CONNECTIONS = 1 << 18  # --max-connections' ceiling: their descriptors fit Linux's default nr_open (2^20)
IDLE_TIMEOUT = 43200.0  # default seconds a connection may move no byte either way (stunnel's TIMEOUTidle)
MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT = 1.0, 7 * 86400.0
#: default seconds without a byte after which a relayed connection gives way to a new one when every slot is
#: taken: the per-host share keeps one host from holding the proxy shut, not eight (or an IPv6 attacker's
#: many /64s) with silent connections for the idle timeout's twelve hours
EVICT_IDLE = 60.0
EVICT_WAIT = 1.0  # seconds a new connection waits for the slot an evicted one gives back
#: default seconds a stop waits for open connections to end, then cuts them: under Kubernetes' 30 s grace
#: period and systemd's 90 s stop timeout, so that the cut is the proxy's own
SHUTDOWN_TIMEOUT, MAX_SHUTDOWN_TIMEOUT = 25.0, 86400.0
RESET_WAIT = 0.5  # seconds b's end of file waits for a write to b under way (splice)
CUT_TIMEOUT = 5.0  # seconds cut() waits for keyden to take its aborts
DRAIN_POLL = 0.25  # seconds between drain()'s looks at stop_now (a signal handler cannot notify it)
#: refusals of tls_accept that say the keyrings themselves no longer serve (not a limit, not the peer)
_CONFIGURATION_ERRORS = (E.ENOKEY, E.EACCES, E.EKEYREVOKED, E.EKEYEXPIRED, E.ENOTDIR)

# The PROXY protocol, version 2 (HAProxy's doc/proxy-protocol.txt).
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_COMMAND_PROXY = 0x21  # version 2 (high nibble), command PROXY: the addresses are the client's
PROXY_V2_TCP_OVER = {socket.AF_INET: 0x11, socket.AF_INET6: 0x21}  # family and transport byte
PROXY_V2_MAX_LENGTH = 0xFFFF  # the 16-bit length after the fixed 16 bytes; a TLV's value has one too
PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_SSL = 0x01, 0x02, 0x20
PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER = 0x21, 0x22, 0x23
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS = 0x01, 0x02, 0x04


def refusal(client, keyring: int, tls_options: dict) -> E.KeydenError | None:
    """Why keyden would refuse our connections' requests, if it would: a tls_accept on a socket whose peer is
    already gone is checked in full (its handshake then ends at once, unheard)."""
    probe, gone = socket.socketpair()
    gone.close()
    try:
        client_tls.start_accept(client, probe, keyring, **tls_options).close()
    except E.KeydenError as exc:
        return exc
    finally:
        probe.close()
    return None


def address_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def proxy_v2_header(info: client_tls.TlsInfo, family: int, source: tuple, destination: tuple) -> bytes:
    """The PROXY protocol v2 header that tells the upstream what only the proxy saw: the client's address
    (``source``, from accept), the address it reached (``destination``, the accepted socket's own), both
    of the accepted socket's ``family``, and the handshake's outcome as TLVs.  ValueError rather than a
    corrupt header if a value does not fit its 16-bit length.

    A certificate in ``info`` was verified: keyden asks for one only with a client trust keyring, fails
    the handshake if it does not chain to it (or is blacklisted), and resumes no session then, so it was
    presented on this very connection (CERT_CONN and CERT_SESS, verify 0).  Without one, verify is 1:
    the spec's "non-zero otherwise" (HAProxy sends 0 there, which a backend could take for verified).
    """
    if family not in PROXY_V2_TCP_OVER:
        raise ValueError(f"no PROXY v2 address block for address family {family!r}")
    layout = "!4s4sHH" if family == socket.AF_INET else "!16s16sHH"
    addresses = struct.pack(layout, _packed_host(family, source[0]), _packed_host(family, destination[0]),
                            source[1], destination[1])
    tlvs = b""
    if info.alpn:
        tlvs += _tlv(PP2_TYPE_ALPN, info.alpn.encode("ascii"))
    if info.server_name:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, info.server_name.encode("utf-8"))
    certified = bool(info.peer_certificate or info.peer_subject)  # a certificate over 64 KiB has a subject only
    client_field = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if certified else 0)
    ssl_value = struct.pack("!BI", client_field, 0 if certified else 1)  # verify: 0 for a verified certificate only
    if info.version:
        ssl_value += _tlv(PP2_SUBTYPE_SSL_VERSION, info.version.encode("ascii"))
    common_name = _common_name(info)
    if common_name is not None:
        ssl_value += _tlv(PP2_SUBTYPE_SSL_CN, common_name.encode("utf-8"))
    if info.cipher:
        ssl_value += _tlv(PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode("ascii"))
    tlvs += _tlv(PP2_TYPE_SSL, ssl_value)
    length = len(addresses) + len(tlvs)
    if length > PROXY_V2_MAX_LENGTH:
        raise ValueError(f"the PROXY v2 header would carry {length} bytes, more than {PROXY_V2_MAX_LENGTH}")
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", PROXY_V2_COMMAND_PROXY, PROXY_V2_TCP_OVER[family],
                                            length) + addresses + tlvs


def _packed_host(family: int, host: str) -> bytes:
    """A socket address's host in network order; an IPv6 scope (``fe80::1%eth0``) is the local host's, dropped."""
    return socket.inet_pton(family, host.split("%", 1)[0])


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > PROXY_V2_MAX_LENGTH:
        raise ValueError(f"PROXY v2 TLV 0x{kind:02x} would carry {len(value)} bytes, more than {PROXY_V2_MAX_LENGTH}")
    return struct.pack("!BH", kind, len(value)) + value


def _common_name(info: client_tls.TlsInfo) -> str | None:
    """The client certificate subject's first commonName, if there is a certificate pyca reads and it has one."""
    try:
        certificate = info.certificate()
    except ValueError:  # not seen: keyden fails the handshake of a chain pyca cannot parse; else, no CN
        return None
    if certificate is None:
        return None
    from cryptography.x509.oid import NameOID  # (pyca's x509 costs every CLI command 30 ms to import)

    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names and isinstance(names[0].value, str) else None


#: accept(2) failures that pass.  Out of descriptors or memory: said at most once per ACCEPT_REPORT_INTERVAL,
#: then a pause (the connection waits in the listen queue).  One connection's own failure (reset before it
#: was taken, or a network error accept(2) says to treat as EAGAIN): the next one is taken at once.
ACCEPT_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_AGAIN = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                          errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH})
ACCEPT_PAUSE, ACCEPT_REPORT_INTERVAL = 0.1, 10.0
#: seconds between the accept loop's looks at a stop: a signal that comes after Python's last check but
#: before accept(2) sleeps interrupts nothing, and its handler runs only at the next bytecode
ACCEPT_POLL = 1.0
#: descriptors one proxied connection may hold: the client's, keyden's plaintext end, the upstream's
FDS_PER_CONNECTION, FD_HEADROOM = 3, 64


class Proxy:
    def __init__(self, client, keyring: int, tls_options: dict, forward, max_connections: int,
                 proxy_protocol: bool = False, close_timeout: float = CLOSE_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, max_per_host: int = MAX_PER_HOST,
                 evict_idle: float = EVICT_IDLE):
        self.client = client
        self.keyring = keyring
        # A session's close_notify only when the backend's answer ended cleanly (splice's finish): a proxy
        # that dies mid-answer leaves its clients a truncation, not a whole (the kernel closes its sockets).
        self.tls_options = {**tls_options, "explicit_close": True}
        self.forward = forward
        self.proxy_protocol = proxy_protocol
        self.close_timeout = close_timeout
        self.idle_timeout = idle_timeout
        self.evict_idle = evict_idle  # 0: never
        self.relays: dict[socket.socket, Relay] = {}  # relayed connections (per_host_lock): who gives way
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_per_host = max_per_host
        self.per_host: collections.Counter[str] = collections.Counter()  # host_of(client) -> connections held
        self.per_host_lock = threading.Lock()
        self.all_left = threading.Condition(self.per_host_lock)  # notified when the last connection has gone
        self.relaying: set[socket.socket] = set()  # plaintext sockets being relayed (per_host_lock): cut() ends them
        self.upstreams: set[socket.socket] = set()  # their TCP backends' sockets (per_host_lock): cut() resets them
        self.cutting = False  # cut() was called (set under per_host_lock; it never goes back, so read without)
        self.lost_keyden = False
        self.stop_requested = False  # stop() was called: run() returns
        self.stop_now = False  # stop(now=True) was called: drain() returns
        self.stopping = False  # run() has returned: the listener is closed, the client will be (after drain())
        self._listener: socket.socket | None = None
        self._stop_lock = threading.Lock()  # (the listener is shut for a lost keyden, or closed, not both at once)
        self.max_connections = max_connections
        self._next_shortage_report = 0.0

    def run(self, listener: socket.socket) -> None:
        """Serve the connections ``listener`` accepts until keyden is lost or stop() is called; then close
        ``listener``.  The connections still open go on: drain() waits for them."""
        wanted = self.max_connections * FDS_PER_CONNECTION + FD_HEADROOM
        if descriptors.raise_fd_limit(wanted) < wanted:
            say(f"tls-proxy: the descriptor limit is below the {wanted} that --max-connections "
                f"{self.max_connections} may hold: past it, new connections wait")
        self._listener = listener
        try:
            self._accept_all(listener)
        finally:
            with self._stop_lock:
                self.stopping = True
                listener.close()

    def stop(self, now: bool = False) -> None:
        """Stop accepting: run() returns; with ``now``, drain() too.  Safe in a signal handler: it only sets
        flags and wakes the accept (a handler that raised could land inside the drain's lock handling)."""
        self.stop_now = self.stop_now or now
        self.stop_requested = True
        if self._listener is not None:
            _wake(self._listener)

    def _accept_all(self, listener: socket.socket) -> None:
        listener.settimeout(ACCEPT_POLL)  # (the sockets it accepts are blocking all the same)
        while not (self.lost_keyden or self.stop_requested):
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.lost_keyden or self.stop_requested:
                    return
                if exc.errno in ACCEPT_SHORTAGE:
                    self._short_of(f"cannot accept a connection now ({exc.strerror}); trying again")
                elif exc.errno not in ACCEPT_AGAIN:
                    raise
                continue
            refused = self._admit(peer)
            if refused:
                _report(peer, refused)
                conn.close()
                continue
            try:
                _start_unsignalled(threading.Thread(target=self._serve, args=(conn, peer, listener), daemon=True))
            except RuntimeError as exc:  # no thread to be had (a limit on tasks or memory): as for descriptors
                conn.close()
                self._left(peer)
                self._short_of(f"cannot start a thread for a connection now ({exc}); closed it")

    def _short_of(self, message: str) -> None:
        """A shortage (descriptors, memory, threads), said at most once per ACCEPT_REPORT_INTERVAL; then a
        pause, not a busy loop."""
        now = time.monotonic()
        if now >= self._next_shortage_report:
            self._next_shortage_report = now + ACCEPT_REPORT_INTERVAL
            say("tls-proxy: " + message)
        time.sleep(ACCEPT_PAUSE)

    def _admit(self, peer) -> str:
        """Take a slot for a connection from ``peer``, and one of its host's (an IPv6 /64 is one host);
        why not, if not.  With every slot taken, a relayed connection idle for evict_idle seconds gives
        way (``_evict``)."""
        host = host_of(peer[0])
        with self.per_host_lock:
            if self.per_host[host] >= self.max_per_host:  # (finished handshakes, then silence, held every slot)
                return f"too many connections from {host} (--max-connections-per-host); closed"
            if self.slots.acquire(blocking=False):
                self.per_host[host] += 1
                return ""
            duplicate = self._evict()
        if duplicate is None:
            return "too many connections; closed"
        with duplicate:
            self._abort(duplicate)  # its relay then ends, and gives its slot back
        if not self.slots.acquire(timeout=EVICT_WAIT):
            return "too many connections (the connection evicted has not let go yet); closed"
        with self.per_host_lock:
            self.per_host[host] += 1
        return ""

    def _evict(self) -> socket.socket | None:
        """Under per_host_lock: pick the connection to give way, of those idle for evict_idle seconds, from
        the host holding the most (a host with one connection loses it last), the idlest of its; mark it
        cut short (its backend gets a reset, as at a stop's cut: a request may be waiting for its answer) and
        return a duplicate of its plaintext socket, for an abort: its client gets no close_notify, so a
        half-given answer cannot pass for a whole one.  None if there is none (or no descriptor to spare)."""
        if not self.evict_idle:
            return None
        now = time.monotonic()
        idle = [relay for relay in self.relays.values()
                if not relay.evicted and now - relay.moved[0] >= self.evict_idle]
        if not idle:
            return None
        chosen = max(idle, key=lambda relay: (self.per_host[relay.host], now - relay.moved[0]))
        try:
            duplicate = chosen.socket.dup()  # (under the lock: it is still relayed, its number not reused)
        except OSError:
            return None
        chosen.evicted = True  # (once)
        return duplicate

    def _left(self, peer) -> None:
        """Give back what ``_admit`` took."""
        host = host_of(peer[0])
        with self.per_host_lock:
            self.slots.release()
            self.per_host[host] -= 1
            if not self.per_host[host]:
                del self.per_host[host]
                if not self.per_host:
                    self.all_left.notify_all()

    def open_connections(self) -> int:
        with self.per_host_lock:
            return sum(self.per_host.values())

    def drain(self, timeout: float) -> int:
        """After run(): wait up to ``timeout`` seconds for the connections still open (handshakes included)
        to end by themselves, or for stop(now=True); how many are left."""
        deadline = time.monotonic() + timeout
        with self.all_left:
            while self.per_host and not self.stop_now and (left := deadline - time.monotonic()) > 0:
                self.all_left.wait(min(left, DRAIN_POLL))
            return sum(self.per_host.values())

    def cut(self) -> None:
        """End the connections still open without close_notify (tls_abort): what their clients got so far
        may be half an answer.  Connections that reach the relay after this are ended as they come.  Each
        abort is made on a duplicate, taken under the lock that guards ``relaying`` (a socket leaves it
        before it is closed), so that no abort can name a descriptor number reused meanwhile; a socket
        that cannot be duplicated (no descriptor left) is aborted under that lock instead.  A keyden that
        does not answer holds the stop for at most CUT_TIMEOUT seconds."""
        duplicates, undoubled = [], []
        with self.per_host_lock:
            self.cutting = True
            for plain in self.relaying:
                try:
                    duplicates.append(plain.dup())
                except OSError:  # EMFILE, ENFILE: the very state a stop may come in
                    undoubled.append(plain)
            for upstream in self.upstreams:  # now: the proxy may exit before a relay's thread gets to it
                _reset_on_close(upstream)
        aborts = threading.Thread(target=self._abort_all, args=(duplicates, undoubled), daemon=True)
        aborts.start()
        aborts.join(CUT_TIMEOUT)

    def _abort_all(self, duplicates: list[socket.socket], undoubled: list[socket.socket]) -> None:
        for plain in duplicates:
            with plain:
                self._abort(plain)
        for plain in undoubled:
            with self.per_host_lock:  # still relayed: not closed, its number not reused
                if plain in self.relaying:
                    self._abort(plain)

    def _abort(self, plain: socket.socket) -> None:
        """End ``plain``'s TLS session without close_notify; keyden lost, the session is gone with it."""
        with contextlib.suppress(E.KeydenError):
            client_tls.tls_abort(self.client, plain)

    @contextlib.contextmanager
    def _in_cuts_reach(self, upstream: socket.socket):
        """A TCP backend's socket, while relayed: a cut sets it to reset at its close there and then (a FIN
        would tell the backend that half a request was whole).  Out of reach, under the lock, before it is
        closed: its number may be reused."""
        if upstream.family == socket.AF_UNIX:  # no reset there: it reads end of file
            yield
            return
        with self.per_host_lock:
            self.upstreams.add(upstream)
            if self.cutting:
                _reset_on_close(upstream)
        try:
            yield
        finally:
            with self.per_host_lock:
                self.upstreams.discard(upstream)

    def _truncated(self, plain: socket.socket) -> bool:
        """At the end of a client's data: may it be cut short?  Yes if its peer ended without close_notify,
        if a stop cut it or it was evicted (what the backend got so far may be half a request), or if the
        session ended with our close_notify (the backend's answer was over) before the client's own end:
        keyden drops what the client still sends, and a backend reading on must not take that for the end
        (a backend that reads on after its answer only to close gently reads a reset there instead of end
        of file: what it logs, if anything, costs less than a cut upload taken for whole)."""
        relay = self.relays.get(plain)
        if self.cutting or (relay is not None and relay.evicted):
            return True
        end = client_tls.tls_peer_end(self.client, plain)
        return end == "truncated" or (end != "close_notify" and relay is not None and relay.finished)

    def _finish(self, plain: socket.socket) -> None:
        """The backend's answer ended cleanly: the client's session ends with close_notify."""
        relay = self.relays.get(plain)
        if relay is not None:
            relay.finished = True
        client_tls.tls_close_notify(self.client, plain)

    @contextlib.contextmanager
    def _held(self, plain: socket.socket):
        """The plaintext socket keyden handed back, in cut()'s reach from now until it is closed here; False
        for one that comes after a cut, ended at once."""
        with self.per_host_lock:
            cut = self.cutting
            self.relaying.add(plain)
        try:
            if cut:
                self._abort(plain)
            yield not cut
        finally:
            with self.per_host_lock:
                self.relaying.discard(plain)
            plain.close()

    def _relay_established(self, plain: socket.socket, family: int, peer, local, listener: socket.socket) -> None:
        """The handshake's outcome, then the upstream connection (with its PROXY header), then the relay."""
        try:
            info = client_tls.established(plain, self.tls_options["handshake_timeout"] + client_tls.OUTCOME_GRACE)
        except E.KeydenError as exc:  # the handshake's: the peer's doing, or the network's, or keyden stopping
            self._failed(peer, exc, listener, request=False)
            return
        # Each failure below ends the client's session without close_notify: a clean end after no answer
        # would pass for a whole, empty one where an answer ends with its connection (HTTP/1.0, a stream).
        header = b""
        if self.proxy_protocol:
            try:
                header = proxy_v2_header(info, family, peer, local)
            except (ValueError, OSError) as exc:  # a value too long for its length field: no corrupt header
                self._abort(plain)
                _report(peer, f"no PROXY header for this connection: {exc}; ended")
                return
        where = self.forward if isinstance(self.forward, str) else "%s:%d" % self.forward
        try:
            upstream = self._connect_forward()
        except OSError as exc:
            self._abort(plain)
            _report(peer, f"cannot reach {where}: {exc.strerror}")
            return
        with upstream, self._in_cuts_reach(upstream):
            if header:
                try:
                    upstream.sendall(header)  # in one piece, as the spec asks, before any of the client's bytes
                except OSError as exc:
                    self._abort(plain)
                    _report(peer, f"cannot send the PROXY header to {where}: {exc.strerror}")
                    return
            relay = Relay(plain, host_of(peer[0]))
            with self.per_host_lock:
                self.relays[plain] = relay
            try:
                splice(plain, upstream, self.close_timeout, self.idle_timeout, abort=lambda: self._abort(plain),
                       truncated=lambda: self._truncated(plain), moved=relay.moved,
                       finish=lambda: self._finish(plain))
            except RuntimeError as exc:  # no thread to be had for the other direction
                self._abort(plain)
                _report(peer, f"cannot relay the connection: {exc}; ended")
            finally:
                with self.per_host_lock:
                    del self.relays[plain]

    def _serve(self, conn: socket.socket, peer, listener: socket.socket) -> None:
        try:
            family = conn.family
            try:
                local = conn.getsockname()  # now: keyden takes conn over, and the PROXY header names it
            except OSError as exc:
                conn.close()
                _report(peer, f"the accepted connection failed: {exc.strerror}")
                return
            try:
                plain = client_tls.start_accept(self.client, conn, self.keyring, **self.tls_options)
            except E.KeydenError as exc:  # the request's refusal: ours, never the peer's doing
                conn.close()
                self._failed(peer, exc, listener, request=True)
                return
            with self._held(plain) as live:
                if live:
                    self._relay_established(plain, family, peer, local, listener)
        finally:
            self._left(peer)

    def _failed(self, peer, exc: E.KeydenError, listener: socket.socket, request: bool) -> None:
        """Report a connection that failed; stop accepting (exit 1) if keyden is gone, or, when keyden
        refused the ``request`` itself, if it no longer serves our configuration."""
        _report(peer, exc.message or exc.strerror())
        if self.stopping:  # the client may be closed already: its refusals say nothing of keyden
            return
        gone = isinstance(exc, E.ECONNRESET) and not self._keyden_answers()
        if gone or request and self._no_longer_served(exc):
            with self._stop_lock:
                if not self.stopping:
                    self.lost_keyden = True
                    _wake(listener)

    def _no_longer_served(self, exc: E.KeydenError) -> bool:
        """Is this refusal of the request our configuration's, for good?  A keyring revoked, expired or gone
        with a restarted daemon (a serial names a key of one daemon's life; a persistent keyring is not ours
        again until get_persistent links it) says so, and a probe confirms it; a limit (EAGAIN, EMFILE,
        ENFILE: other connections' doing) never does.  Then the proxy stops, exit 1, and its supervisor's
        restart resolves --keyring anew."""
        if not isinstance(exc, _CONFIGURATION_ERRORS):
            return False
        refused = refusal(self.client, self.keyring, self.tls_options)
        if not isinstance(refused, _CONFIGURATION_ERRORS):
            return False
        say(f"tls-proxy: keyden no longer serves this configuration: {refused.message or refused.strerror()}; "
            "stopping")
        return True

    def _keyden_answers(self) -> bool:
        try:
            self.client.ping(b"")
            return True
        except E.KeydenError:
            return False

    def _connect_forward(self) -> socket.socket:
        if isinstance(self.forward, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.forward[len("unix:"):])
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(self.forward)
        try:  # what splice reads it writes at once: Nagle would hold a short write back behind one not yet
            #   acknowledged (40 ms, with the peer's delayed ACK), as nginx's tcp_nodelay avoids
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return sock


class Relay:
    """A relayed connection as the proxy's admission sees it: its plaintext socket, its client's host,
    when a byte last moved on it (``splice`` keeps that up to date), and whether it was evicted (then it
    is cut short)."""

    def __init__(self, plain: socket.socket, host: str):
        self.socket = plain
        self.host = host
        self.moved = [time.monotonic()]
        self.evicted = False
        self.finished = False  # its session ended with our close_notify: what the client sent after is dropped


def splice(a: socket.socket, b: socket.socket, close_timeout: float = CLOSE_TIMEOUT,
           idle_timeout: float = 0.0, abort: Callable[[], None] | None = None,
           truncated: Callable[[], bool] | None = None, moved: list[float] | None = None,
           finish: Callable[[], None] | None = None) -> None:
    """Copy both ways until both ends are done, passing each end-of-file on as a half-close; the caller
    closes both sockets after.

    A side that closes while the other still sends (a backend that answers 413 to an upload and
    closes) ends only the direction towards it: its answer, on the way the other direction, still gets
    through, as it would straight over TCP, for up to ``close_timeout`` seconds (then it is cut short).
    A side that breaks (a reset) ends both.  When ``b`` breaks, or an answer is cut short, ``abort`` (if
    given) first ends ``a``'s TLS session without close_notify (what was passed on still goes out), so
    that the client cannot take half an answer for a whole one.  The other way, ``truncated`` (if
    given) says at ``a``'s end of file whether ``a``'s data may be cut short (its TLS peer ended without
    close_notify, or the proxy cut it): then ``b`` gets a reset, not a FIN, so that the backend cannot
    take half a request for a whole one.  With an
    ``idle_timeout``, a connection on which no byte moved either way for that long ends too: a side that
    stops reading but keeps its end open (a write to it blocks, never fails) must not hold the
    connection's slot for ever.  ``moved`` (if given): a one-item list kept set to when a byte last moved.
    ``finish`` (if given) passes ``b``'s clean end on to ``a`` in place of a half-close (``a``'s TLS session's
    close_notify, for a session that sends none on a bare end of file); if it fails, the half-close.
    """
    _Splice(a, b, close_timeout, idle_timeout, abort, truncated, moved, finish).run()


class _Splice:
    """One ``splice``: the client's side ``a`` copied to the backend ``b`` on the caller's thread, ``b`` to
    ``a`` on another, and (with an idle timeout) a third that watches for no byte moving."""

    def __init__(self, a: socket.socket, b: socket.socket, close_timeout: float, idle_timeout: float,
                 abort: Callable[[], None] | None, truncated: Callable[[], bool] | None,
                 moved: list[float] | None, finish: Callable[[], None] | None):
        self.a, self.b = a, b
        self.close_timeout, self.idle_timeout = close_timeout, idle_timeout
        self.abort, self.truncated, self.finish = abort, truncated, finish
        self.moved = moved if moved is not None else [time.monotonic()]  # when a byte last moved, either way
        self.truncation_seen = False
        # A reset of b's is reported once, maybe to the thread writing to b: the other then reads a plain end
        # of file.  So at b's end of file, a write to b still under way is waited for (briefly: one that
        # blocks has taken no error) before the end is taken for a clean one.
        self.b_reset = threading.Event()
        self.writing_b = threading.Lock()
        self.b_cut = False  # the idle timeout cut b (cut_b): no more writes to it
        self.grace: list[threading.Timer] = []
        self.finished = threading.Event()

    def run(self) -> None:
        watch = threading.Thread(target=self.end_when_idle, daemon=True) if self.idle_timeout else None
        back = threading.Thread(target=self.copy, args=(self.b, self.a.sendall, self.b_ended), daemon=True)
        try:
            if watch is not None:
                watch.start()
            back.start()  # (RuntimeError with no thread to be had: the connection ends; the caller closes it)
            self.copy(self.a, self.write_b, self.a_ended)
            back.join()
        finally:
            self.finished.set()
            for timer in self.grace:
                timer.cancel()
                timer.join()  # one already firing finishes before the descriptors close (numbers are reused)
            if watch is not None and watch.ident is not None:
                watch.join()

    def copy(self, src: socket.socket, send: Callable, ended: Callable[[bool], None]) -> None:
        moved = self.moved
        try:
            while chunk := src.recv(CHUNK):
                moved[0] = time.monotonic()
                try:
                    send(chunk)
                except OSError:  # dst is closed: this direction is over; the other carries its answer
                    self.cut_short_later()
                    return
                moved[0] = time.monotonic()
            ended(False)
        except OSError:  # src broke (or its end could not be passed on): end both directions
            ended(True)

    def cut_short_later(self) -> None:
        """The direction still open gets ``close_timeout`` seconds to finish, then it is cut short."""
        timer = threading.Timer(self.close_timeout, self.b_ended, (True,))
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread for the grace: none, then
            self.b_ended(True)
            return
        self.grace.append(timer)

    def end_when_idle(self) -> None:
        """No byte moved for so long: cut short (``abort``).  An idle keep-alive connection cannot be told
        from an answer that stalled half-way (a backend that paused, a client that stopped reading): no
        close_notify may vouch for the latter, and a client between requests takes a cut as a close."""
        moved, idle_timeout = self.moved, self.idle_timeout
        while not self.finished.wait(max(0.0, moved[0] + idle_timeout - time.monotonic())):
            if time.monotonic() - moved[0] >= idle_timeout:
                tcp = self.b.family != socket.AF_UNIX
                if tcp:  # first: a's end, which the abort brings at once, is a cut too (a_ended sends no FIN)
                    self.truncation_seen = True
                if self.abort is not None:
                    with contextlib.suppress(Exception):  # (keyden lost: the session is gone with it)
                        self.abort()
                if tcp:  # an upload that stalled must not reach a TCP backend as whole
                    self.cut_b()
                    with contextlib.suppress(OSError):
                        self.a.shutdown(socket.SHUT_RDWR)
                    return
                self.end_both()
                return

    def cut_b(self) -> None:
        """End the TCP backend's connection with a reset, and every write to it: at once (disconnect), else
        as a_ended does (a reset at the close), with writes to come refused and one blocked failed."""
        self.b_cut = True  # (write_b checks it under writing_b: no write starts from now on)
        try:
            descriptors.disconnect(self.b)  # the reset now; a write under way fails
            return
        except OSError:  # (EBUSY: a kernel that refuses while the reader waits on b)
            pass
        with contextlib.suppress(OSError):
            descriptors.reset_on_close(self.b)  # (the caller closes it: a reset, no FIN first)
            self.b.shutdown(socket.SHUT_RD)  # wakes the reader; sends nothing
        with contextlib.suppress(OSError):
            descriptors.disconnect(self.b)  # (nobody waits to read now)
            return
        if not self.writing_b.acquire(blocking=False):  # a write blocked on b (it reads nothing): it must
            with contextlib.suppress(OSError):          # fail, its FIN behind what b never read, the reset
                self.b.shutdown(socket.SHUT_WR)         # at the close first
        else:
            self.writing_b.release()

    def end_both(self) -> None:
        for s in (self.a, self.b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def a_truncated(self) -> bool:
        """Whether a's data may be cut short.  (Asked at every end of a, including ones the proxy caused: a
        truncation, once known, is kept.)"""
        if not self.truncation_seen and self.truncated is not None:
            try:
                self.truncation_seen = bool(self.truncated())
            except Exception:  # keyden cannot say (lost, or the session just ended): fail closed, as a cut
                self.truncation_seen = True
        return self.truncation_seen

    def a_ended(self, broke: bool) -> None:
        """The client's end reaches b as it came: a truncation as a reset (where b is TCP), else a FIN."""
        a, b = self.a, self.b
        if self.a_truncated() and b.family != socket.AF_UNIX:
            try:  # closed with SO_LINGER 0 by the caller, never shut for writing: no FIN first
                descriptors.reset_on_close(b)
                b.shutdown(socket.SHUT_RD)  # (sends nothing; the other direction reads its end of file)
                a.shutdown(socket.SHUT_RDWR)
                return
            except OSError:
                pass
        elif not broke:
            b.shutdown(socket.SHUT_WR)
            return
        self.end_both()

    def write_b(self, chunk) -> None:
        with self.writing_b:
            if self.b_cut:
                raise BrokenPipeError(errno.EPIPE, "the backend's connection was cut")
            try:
                self.b.sendall(chunk)
            except ConnectionResetError:
                self.b_reset.set()
                raise

    def b_ended(self, broke: bool) -> None:
        """b's end reaches the client as it came: a reset (or the proxy's cut) as an abort, else close_notify.
        (TCP's state cannot tell a reset: a backend that sends a FIN, then closes with our data unread,
        resets a connection that had ended cleanly.)"""
        if not broke and self.writing_b.acquire(timeout=RESET_WAIT):
            self.writing_b.release()
        if (broke or self.b_reset.is_set()) and self.abort is not None:
            try:
                self.abort()
            except Exception:  # (keyden lost: the session is gone with it) the shutdown ends it anyway
                pass
        if broke:
            self.end_both()
            return
        if self.finish is not None and not self.b_reset.is_set():
            try:
                self.finish()
                return
            except Exception:  # (keyden lost: the session is gone with it) the half-close, as without
                pass
        self.a.shutdown(socket.SHUT_WR)


def _reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # (a socket the backend has reset already)
        descriptors.reset_on_close(sock)


def _start_unsignalled(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGTERM and SIGINT blocked (the threads it starts inherit that), so that the
    kernel gives them to the main thread, whose accept() they must interrupt for the Python handler to
    run.  Else two in a row went to other threads (the main thread had one pending already), and the
    main thread slept on in accept()."""
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def _wake(listener: socket.socket) -> None:
    """Make a listener's accept return (EINVAL): stop() and a lost keyden may both ask."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:  # shut already (ENOTCONN)
        pass


def _report(peer, what: str) -> None:
    say(f"tls-proxy: {peer[0]}:{peer[1]}: {what}")


def say(line: str) -> None:
    """One line on stderr in one write: print() writes the newline apart, and two connections' threads
    ran their reports into one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
