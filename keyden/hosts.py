"""The host a peer address stands for, in per-host limits: the TLS engine's handshakes, tls-proxy's connections."""

from __future__ import annotations

import ipaddress


def host_of(address: str) -> str:
    """An IPv4 address (an IPv4-mapped IPv6 one too), else the IPv6 /64 it is in: one host holds a whole /64,
    and would otherwise take every per-host share alone.  Anything else (a Unix socket's name) as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 6:
        return str(ip.ipv4_mapped or ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
