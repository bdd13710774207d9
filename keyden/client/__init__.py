"""Client side: a blocking client, an asyncio client, and key handles that hold no material."""
