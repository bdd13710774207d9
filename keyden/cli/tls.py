"""`keyden tls-proxy`: its options, checked, and the proxy (keyden/proxy.py) started on them."""

from __future__ import annotations

import argparse
import signal
import socket
import time

from keyden import proxy
from keyden.cli.support import Exit
from keyden.proxy import (CLOSE_TIMEOUT, EVICT_IDLE, IDLE_TIMEOUT, MAX_CLOSE_TIMEOUT, MAX_CONNECTIONS, MAX_IDLE_TIMEOUT,
                          MAX_PER_HOST, MAX_SHUTDOWN_TIMEOUT, MIN_IDLE_TIMEOUT, SHUTDOWN_TIMEOUT)
from keyden.tls import DEFAULT_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_TIMEOUT


def cmd_tls_proxy(ctx, args) -> int:
    opts = _parse(args)
    listen = _address(opts.listen, "--listen")
    forward = _forward(opts.forward)
    tls_options = {"client_trust": ctx.key(opts.client_trust) if opts.client_trust else 0,
                   "require_client_cert": opts.require_client_cert,
                   "alpn": _alpn(opts.alpn),
                   "handshake_timeout": opts.handshake_timeout}
    keyring = ctx.key(opts.keyring)
    client = ctx.client
    _preflight(client, keyring, tls_options)
    try:
        family = proxy.address_family(listen[0])  # "::" takes IPv4 clients too, as ::ffff:a.b.c.d, where the system can
        listener = socket.create_server(listen, family=family, backlog=128,
                                        dualstack_ipv6=listen[0] == "::" and socket.has_dualstack_ipv6())
    except OSError as exc:  # socket.create_server appends the address again, as a Python tuple: not ours to show
        reason = (exc.strerror or str(exc)).split(" (while attempting to bind", 1)[0]
        raise Exit(1, f"tls-proxy: cannot listen on {opts.listen}: {reason}") from None
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    running = proxy.Proxy(client, keyring, tls_options, forward, opts.max_connections, opts.proxy_protocol,
                          opts.close_timeout, opts.idle_timeout, opts.max_connections_per_host, opts.evict_idle)

    first_stop: list[float] = []

    def stop(_signum, _frame):
        if not first_stop:
            first_stop.append(time.monotonic())
            running.stop()
        elif time.monotonic() - first_stop[0] >= REPEAT_AFTER:
            running.stop(now=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)  # before the line that tells a supervisor we are up
    print(f"tls-proxy: listening on {shown}, forwarding to {opts.forward}", flush=True)
    try:
        running.run(listener)  # (which closes the listener)
        if running.lost_keyden:  # at once: the supervisor's restart is what serves again
            return 1
        _drain(running, opts.shutdown_timeout)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the exit is decided: no late signal cuts it short (as
            signal.signal(sig, signal.SIG_IGN)       # Python's own handlers would, once it resets them at exit)


#: a repeated stop counts only this many seconds after the first: a supervisor and a wrapper (`keyden
#: session`, which passes SIGTERM on) may both pass on one stop
REPEAT_AFTER = 1.0


def _drain(running: proxy.Proxy, timeout: float) -> None:
    """A stop lets the open connections end by themselves, up to ``timeout`` seconds, then cuts them."""
    if not (left := running.open_connections()):
        return
    if timeout:
        proxy.say(f"tls-proxy: stopping: waiting up to {timeout:g} s for {_connections(left)} to end "
                  "(another SIGTERM or SIGINT: stop now)")
        left = running.drain(timeout)
    if left:
        running.cut()
        proxy.say(f"tls-proxy: stopping: {_connections(left)} cut")


def _connections(n: int) -> str:
    return f"{n} open connection{'s' if n != 1 else ''}"


def _parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="keyden tls-proxy",
                                description="Terminate TLS with keys held in keyden; forward the plaintext.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to accept TLS connections")
    p.add_argument("--keyring", required=True, help="keyring holding the certificates and their private keys")
    p.add_argument("--forward", required=True, metavar="HOST:PORT|unix:/path", help="where the plaintext goes")
    p.add_argument("--client-trust", metavar="RING", help="keyring of CAs client certificates must chain to")
    p.add_argument("--require-client-cert", action="store_true", help="refuse clients without a certificate")
    p.add_argument("--alpn", metavar="P1,P2", help="ALPN protocols offered, in preference order")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help=f"connections open at once, handshaking or not (default 256; at most {MAX_CONNECTIONS})")
    p.add_argument("--max-connections-per-host", type=int, default=MAX_PER_HOST, metavar="N",
                   help="connections one client address may hold at once, handshaking or not, so that one "
                        f"host cannot hold every slot (default {MAX_PER_HOST}; at most --max-connections)")
    p.add_argument("--close-timeout", type=float, default=CLOSE_TIMEOUT, metavar="SECONDS",
                   help="once one side has closed (a write to it fails), how long the other has to finish its "
                        f"answer and close (default {CLOSE_TIMEOUT:g})")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help="close a connection on which the proxy moved no byte either way for this long, a side "
                        "that stopped reading but keeps its end open included; megabytes of buffers lie between "
                        "the proxy and each peer, so keep it well above what the slowest peer takes to read "
                        f"them (default {IDLE_TIMEOUT:g}; 0: never)")
    p.add_argument("--evict-idle", type=float, default=EVICT_IDLE, metavar="SECONDS",
                   help="when every slot is taken, a relayed connection on which no byte has moved for this long "
                        "gives way to a new one: the idlest of the host holding the most, cut short as at a stop "
                        f"(default {EVICT_IDLE:g}; 0: never)")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM or SIGINT, stop accepting and give the open connections this long to end by "
                        f"themselves before cutting them (default {SHUTDOWN_TIMEOUT:g}; 0: cut them at once; "
                        "another signal, a second or more after the first: at once)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="begin each upstream connection with a PROXY protocol v2 header: the client's address, "
                        "SNI, ALPN, TLS version and cipher, client certificate CN (the upstream must expect it)")
    try:
        opts = p.parse_args(args)
    except SystemExit as exc:  # argparse has printed the usage or the help
        raise Exit(2 if exc.code else 0) from None
    if opts.client_trust == "":  # not "no client certificates", silently
        raise Exit(2, "tls-proxy: --client-trust takes a keyring")
    if not 1 <= opts.max_connections <= MAX_CONNECTIONS:
        raise Exit(2, f"tls-proxy: --max-connections takes a number of connections, 1 to {MAX_CONNECTIONS}")
    if not 1 <= opts.max_connections_per_host <= MAX_CONNECTIONS:
        raise Exit(2, f"tls-proxy: --max-connections-per-host takes a number of connections, 1 to {MAX_CONNECTIONS}")
    if not 0 < opts.handshake_timeout <= MAX_HANDSHAKE_TIMEOUT:  # nan fails too
        raise Exit(2, f"tls-proxy: --handshake-timeout takes seconds, more than 0 and at most "
                      f"{MAX_HANDSHAKE_TIMEOUT:g}")
    if not 0 < opts.close_timeout <= MAX_CLOSE_TIMEOUT:
        raise Exit(2, f"tls-proxy: --close-timeout takes seconds, more than 0 and at most {MAX_CLOSE_TIMEOUT:g}")
    if not (opts.idle_timeout == 0 or MIN_IDLE_TIMEOUT <= opts.idle_timeout <= MAX_IDLE_TIMEOUT):
        raise Exit(2, f"tls-proxy: --idle-timeout takes seconds, {MIN_IDLE_TIMEOUT:g} up to {MAX_IDLE_TIMEOUT:g}, "
                      "or 0 (never)")
    if not (opts.evict_idle == 0 or MIN_IDLE_TIMEOUT <= opts.evict_idle <= MAX_IDLE_TIMEOUT):
        raise Exit(2, f"tls-proxy: --evict-idle takes seconds, {MIN_IDLE_TIMEOUT:g} up to {MAX_IDLE_TIMEOUT:g}, "
                      "or 0 (never)")
    if not 0 <= opts.shutdown_timeout <= MAX_SHUTDOWN_TIMEOUT:
        raise Exit(2, f"tls-proxy: --shutdown-timeout takes seconds, 0 up to {MAX_SHUTDOWN_TIMEOUT:g}")
    return opts


def _preflight(client, keyring: int, tls_options: dict) -> None:
    """Fail at start, not at the first connection, if keyden refuses the keyrings or options."""
    refused = proxy.refusal(client, keyring, tls_options)
    if refused is not None:
        raise Exit(1, f"tls-proxy: keyden refuses this configuration: {refused.message or refused.strerror()}")


def _address(text: str, option: str, no_host: str = "0.0.0.0") -> tuple[str, int]:
    """HOST:PORT (``no_host`` for an empty host: listening anywhere)."""
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535 \
            or not (host.isascii() and host.isprintable()):
        raise Exit(2, f"tls-proxy: {option} takes HOST:PORT (a port up to 65535), not {text[:300]!r}")
    return host.strip("[]") or no_host, int(port)


def _forward(text: str) -> str | tuple[str, int]:
    """--forward: a host and a port to connect to (neither may be left out: "listen anywhere" and "any
    port" mean nothing to connect to), or unix:/path.  Refused at start, not at every connection."""
    if text.startswith("unix:"):
        if len(text) == len("unix:"):
            raise Exit(2, "tls-proxy: --forward unix: takes a socket path, not an empty string")
        return text
    host, port = _address(text, "--forward", no_host="")
    if not host or not port:
        raise Exit(2, f"tls-proxy: --forward takes HOST:PORT with a host and a port from 1, not {text[:300]!r}")
    return host, port


def _alpn(text: str | None) -> list[str] | None:
    """--alpn P1,P2: protocol names are printable ASCII (RFC 7301 allows any bytes; none in use is else)."""
    if text is None:
        return None
    names = [p for p in text.split(",") if p]
    if not names or not (text.isascii() and text.isprintable()):
        raise Exit(2, f"tls-proxy: --alpn takes protocol names in printable ASCII, not {text[:300]!r}")
    return names
