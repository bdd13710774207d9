"""Load: 500 concurrent connections doing mixed operations against one daemon for a bounded time.

A few client processes each hold many asyncio connections; every connection loops add, read,
describe, search, link, unlink, sign and an AEAD round trip, keeping its last few keys and
invalidating older ones.  Checked: no operation fails, no key whose add succeeded is lost (every
key still held reads back its own payload), and the daemon's memory is flat (the second half of
the run does not outgrow the first) and bounded after the run.

Runs ~10 s; KEYDEN_LOAD_SECONDS and KEYDEN_LOAD_CONNECTIONS make it longer or wider.  The figures
are printed (pytest -s shows them) and quoted in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections import deque

from cryptography.hazmat.primitives.serialization import load_der_public_key

import keyden.client.aio

SECONDS = float(os.environ.get("KEYDEN_LOAD_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("KEYDEN_LOAD_CONNECTIONS", "500"))
PROCESSES = 4
KEEP = 4  # keys each connection holds at a time; older ones are invalidated, so the store stays a steady size
STEP_TIMEOUT = 60  # a hung daemon fails the run instead of hanging it
GROWTH = 1.5  # the second half's peak RSS may be at most this factor of the first half's (plus slack)
SLACK_KIB = 16 * 1024


async def _loop(c, keys: dict, label: str, stop: asyncio.Event) -> tuple[int, int, str | None, list]:
    """One connection's work until ``stop``: (operations done, failures, first failure, keys still held)."""
    verify = load_der_public_key(keys["spki"]).verify
    held: deque[tuple[int, bytes]] = deque()
    ops = failures = n = 0
    first_failure = None

    async def step(description: str, payload: bytes) -> int:
        serial = await c.add("user", description, payload, "@s")
        held.append((serial, payload))
        assert await c.read(serial) == payload
        assert (await c.describe(serial)).description == description
        assert await c.search("@s", "user", description) == serial
        await c.link(serial, keys["ring"])
        await c.unlink(serial, keys["ring"])
        verify(await c.pkey_sign(keys["signer"], "", payload), payload)
        sealed = await c.cipher("gcm(aes)", keys["aes"], payload, random_nonce=True)
        assert await c.cipher("gcm(aes)", keys["aes"], sealed, decrypt=True, random_nonce=True) == payload
        if len(held) > KEEP:
            await c.invalidate(held.popleft()[0])
            return 10
        return 9

    while not stop.is_set():
        description = f"load-{label}-{n}"
        try:
            ops += await asyncio.wait_for(step(description, os.urandom(16) + description.encode()), STEP_TIMEOUT)
        except Exception as exc:  # counted, and the test asserts there were none
            failures += 1
            first_failure = first_failure or repr(exc)
        n += 1
    return ops, failures, first_failure, [(serial, payload.hex()) for serial, payload in held]


def _client_process(socket_path: str, token: str, keys: dict, connections: int, seconds: float,
                    ready, go, results) -> None:
    """One client process: ``connections`` connections, all working from ``go`` for ``seconds``."""

    async def main():
        clients = [await keyden.client.aio.connect(socket_path, session=token) for _ in range(connections)]
        ready.set()
        while not go.is_set():  # everyone starts together once every process is connected
            await asyncio.sleep(0.01)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        outcome = await asyncio.gather(*(_loop(c, keys, f"{os.getpid()}-{i}", stop) for i, c in enumerate(clients)))
        for c in clients:
            c.close()
        return outcome

    try:
        results.put(("ok", asyncio.run(main())))
    except BaseException as exc:
        results.put(("crashed", repr(exc)))


def test_500_connections_mixed_operations_no_errors_no_lost_keys_flat_memory(fresh_daemon):
    d = fresh_daemon(f"max_connections_per_uid = {CONNECTIONS + 64}\nmax_connections = {CONNECTIONS + 64}\n")
    with d.connect() as boot:
        _serial, token = boot.join_session()
    setup = d.connect(session=token)
    signer = setup.generate("ed25519", "load-signer")
    keys = {"signer": signer, "spki": setup.public_key_bytes(signer)[0],
            "aes": setup.add("logon", "load:aes", os.urandom(32), "@s"), "ring": setup.newring("load-ring", "@s")}

    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    readies, procs = [], []
    for i in range(PROCESSES):
        share = CONNECTIONS // PROCESSES + (i < CONNECTIONS % PROCESSES)
        ready = ctx.Event()
        procs.append(ctx.Process(target=_client_process,
                                 args=(d.socket, token, keys, share, SECONDS, ready, go, results), daemon=True))
        readies.append(ready)
    for p in procs:
        p.start()
    try:
        for ready in readies:
            assert ready.wait(60), "client processes did not connect"
        connected_rss = d.memory_kib()
        samples: list[int] = []
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.25):
                samples.append(d.memory_kib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        go.set()
        outcomes = [results.get(timeout=SECONDS + 120) for _ in procs]
        elapsed = time.monotonic() - started
        sampling.set()
        sampler.join()
    finally:
        go.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()

    crashed = [detail for status, detail in outcomes if status != "ok"]
    assert not crashed, crashed
    per_connection = [row for _status, rows in outcomes for row in rows]
    assert len(per_connection) == CONNECTIONS
    ops = sum(row[0] for row in per_connection)
    failures = [(row[1], row[2]) for row in per_connection if row[1]]
    assert not failures, f"{len(failures)} connections saw failures, e.g. {failures[:3]}"

    # No lost key: every key a connection still held reads back its own payload.
    held = [(serial, bytes.fromhex(payload)) for row in per_connection for serial, payload in row[3]]
    assert len(held) >= CONNECTIONS  # each connection added at least one key
    answers = setup.call_many([("read", (serial,)) for serial, _ in held])
    lost = [serial for (serial, payload), answer in zip(held, answers) if answer != payload]
    assert not lost, f"{len(lost)} keys lost or changed, e.g. {lost[:5]}"

    # Flat memory: the second half's peak is no higher than the first's (generously), and after the run
    # (connections gone) the daemon holds no more than its peak under load.
    half = len(samples) // 2
    first, second = max(samples[:half]), max(samples[half:])
    after = d.memory_kib()
    print(f"\nload: {CONNECTIONS} connections x {elapsed:.1f} s: {ops} ops = {ops / elapsed:.0f} ops/s; daemon RSS "
          f"{connected_rss // 1024} MiB connected, peak {first // 1024} MiB (1st half) / {second // 1024} MiB "
          f"(2nd half), {after // 1024} MiB after; {len(held)} keys held at the end")
    assert second <= first * GROWTH + SLACK_KIB, f"RSS grew from {first} KiB to {second} KiB during the run"
    assert after <= max(samples) + SLACK_KIB
    setup.close()
