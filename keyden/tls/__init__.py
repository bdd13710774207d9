"""TLS terminated inside keyden: the private key and the traffic secrets never leave the daemon.

An application passes a connected socket over the Unix socket (SCM_RIGHTS);
keyden runs the handshake with a certificate and key held in a keyring, runs
the record layer, and passes back the other end of a socketpair that carries
the plaintext.  ``material`` turns keyrings into identities and trust
anchors, ``contexts`` builds the ``ssl`` contexts, ``engine`` runs every
session on a few event-loop threads.  See docs/tls.md.
"""

from __future__ import annotations

DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds
MAX_HANDSHAKE_TIMEOUT = 120.0
