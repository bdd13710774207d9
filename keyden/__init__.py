"""keyden: a key custodian for Linux, modeled on the kernel's key retention service.

Applications refer to keys by serial; the keys stay in the daemon.
"""

from keyden.errors import KeydenError

__version__ = "0.1.0"


def connect(socket=None, *, session=None, timeout=None, reconnect=True, busy_poll=0):
    """Connect to the daemon and return a synchronous ``Client``.

    ``reconnect``: after the daemon closed the connection (an idle timeout, a restart), the next request
    opens a new one (see keyden.client.sync).  ``busy_poll``: microseconds to look for each answer
    before sleeping on it (docs/python-api.md: only for a client with a CPU to itself).
    """
    from keyden.client.sync import Client

    return Client(socket, session=session, timeout=timeout, reconnect=reconnect, busy_poll=busy_poll)


async def aconnect(socket=None, *, session=None, reconnect=True):
    """Connect to the daemon and return an asyncio ``AsyncClient`` (``reconnect`` as for ``connect``)."""
    from keyden.client.aio import AsyncClient
    return await AsyncClient.connect(socket, session=session, reconnect=reconnect)


__all__ = ["connect", "aconnect", "KeydenError", "__version__"]
