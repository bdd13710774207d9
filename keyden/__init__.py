"""keyden: a key custodian for Linux, modeled on the kernel's key retention service.

Applications refer to keys by serial; the keys stay in the daemon.
"""

from keyden.errors import KeydenError

__version__ = "0.1.0"


def connect(socket=None, *, session=None, timeout=None):
    """Connect to the daemon and return a synchronous ``Client``."""
    from keyden.client.sync import Client

    return Client(socket, session=session, timeout=timeout)


async def aconnect(socket=None, *, session=None):
    """Connect to the daemon and return an asyncio ``AsyncClient``."""
    from keyden.client.aio import AsyncClient
    return await AsyncClient.connect(socket, session=session)


__all__ = ["connect", "aconnect", "KeydenError", "__version__"]
