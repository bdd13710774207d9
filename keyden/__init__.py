"""keyden: a key custodian for Linux, modeled on the kernel's key retention service.

Applications refer to keys by serial; the keys stay in the daemon.
"""

from keyden.errors import KeydenError

__version__ = "0.1.0"


def connect(socket=None, *, session=None, timeout=None):
    """Connect to the daemon and return a synchronous ``Client``."""
    from keyden.client.sync import Client

    return Client(socket, session=session, timeout=timeout)


__all__ = ["connect", "KeydenError", "__version__"]
