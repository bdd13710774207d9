"""keyden's benchmarks: each one timed against a baseline measured in the same run.

    python -m bench.run [--quick] [--only NAME[,NAME]] [--json FILE]

Starts a private daemon, runs every registered benchmark and prints a markdown table.  A benchmark
is one function registered with ``@benchmark("name")``: it gets a ``Context`` (socket, session,
timing helpers) and returns a ``Row``.  Ratios are always "higher is better": baseline time /
keyden time, i.e. keyden's speed as a fraction of the baseline's.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, NamedTuple

import keyden
from bench.daemon import REPO, BenchDaemon
from bench.watchdog import Watchdog
from bench.workers import ClientPool
from keyden.protocol.transport import MAX_BUSY_POLL

RATIO_CONVENTION = ("ratio = baseline time / keyden time (= keyden rate / baseline rate): keyden's speed as a "
                    "fraction of the baseline's, higher is better; met = ratio >= target")
TABLE_HEADER = ("| benchmark | keyden | in-process baseline | ratio | target | met |\n"
                "|---|---:|---:|---:|---:|:-:|")


class Row(NamedTuple):
    """One benchmark's result.  A plain 4-tuple (keyden, baseline, unit, target) works too."""

    keyden: float
    baseline: float
    unit: str  # a time per operation ("µs") or a rate (anything ending in "/s")
    target: float | None  # the ratio keyden must reach; None: a reference row, measured for context
    note: str = ""  # what the baseline is, when the name does not say

    @property
    def is_rate(self) -> bool:
        return self.unit.endswith("/s")

    @property
    def ratio(self) -> float:
        return self.keyden / self.baseline if self.is_rate else self.baseline / self.keyden


@dataclass(frozen=True)
class Settings:
    reps: int  # timed repetitions; every figure is their median
    rep_seconds: float  # length of one repetition of a call loop
    round_seconds: float  # length of one round of a client pool
    warmup_seconds: float  # untimed calls before the repetitions
    pingpong_round_trips: int  # per repetition of the C ping-pong floor
    time_limit: float  # seconds one benchmark may take before it is stopped as hung


FULL = Settings(reps=7, rep_seconds=0.6, round_seconds=1.0, warmup_seconds=0.3, pingpong_round_trips=20000,
                time_limit=180)
QUICK = Settings(reps=3, rep_seconds=0.15, round_seconds=0.3, warmup_seconds=0.1, pingpong_round_trips=5000,
                 time_limit=60)


Sampler = Callable[[], float]  # one timed repetition -> its figure (seconds per call, or a rate)


@dataclass
class Context:
    """What a benchmark gets: the daemon, a session keyring of the run's own, and timing helpers.

    Figures come from samplers compared with ``paired``, which alternates keyden's repetitions with
    the baseline's so that load from elsewhere on the machine hits both sides alike.
    """

    socket: str
    session: str
    settings: Settings
    workdir: str  # a temp dir for build products, removed after the run
    busy_poll: int = 0  # µs: the benchmark's own clients busy-poll (--busy-poll); the pools' clients never do

    def connect(self) -> keyden.client.sync.Client:
        return keyden.connect(self.socket, session=self.session, busy_poll=self.busy_poll)

    def calls(self, fn: Callable[[], object]) -> Sampler:
        """Seconds per ``fn()``, timed over a batch sized (on first use, the warm-up) to ~rep_seconds."""
        s = self.settings
        batch = 0

        def sample() -> float:
            nonlocal batch
            if not batch:
                calls, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < s.warmup_seconds or calls < 3:
                    fn()
                    calls += 1
                batch = max(1, round(s.rep_seconds * calls / elapsed))
                return elapsed / calls
            t0 = time.perf_counter()
            for _ in itertools.repeat(None, batch):
                fn()
            return (time.perf_counter() - t0) / batch
        return sample

    def clients(self, n: int, method: str, *args) -> ClientPool:
        """A pool of ``n`` client processes looping ``client.<method>(*args)``; use as a context manager."""
        return ClientPool(n, self.socket, self.session, method, args)

    def rounds(self, pool: ClientPool) -> Sampler:
        """The pool's summed calls per second over one round."""
        return lambda: pool.round(self.settings.round_seconds)

    def paired(self, keyden_sampler: Sampler, baseline_sampler: Sampler) -> tuple[float, float]:
        """Medians of alternating repetitions, after one discarded warm-up sample of each."""
        keyden_sampler(), baseline_sampler()
        samples = [(keyden_sampler(), baseline_sampler()) for _ in range(self.settings.reps)]
        return statistics.median(k for k, _ in samples), statistics.median(b for _, b in samples)


Benchmark = Callable[[Context], "Row | tuple"]
#: name -> benchmark, in the order they run.
BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    def register(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = fn
        return fn
    return register


# ------------------------------------------------------------------ benchmarks

@benchmark("ping")
def ping(ctx: Context) -> Row:
    """A tiny request's round trip vs two processes bouncing 1 byte over a socketpair."""
    floor, how = pingpong_floor(ctx)
    with ctx.connect() as c:
        keyden_s, floor_s = ctx.paired(ctx.calls(lambda: c.ping(b"")), floor)
    return Row(keyden_s * 1e6, floor_s * 1e6, "µs", 1 / 1.3, how)


@benchmark("concurrency")
def concurrency(ctx: Context) -> Row:
    """8 client processes doing tiny requests vs 1: does the daemon scale past one client?"""
    with ctx.clients(8, "ping", b"") as eight, ctx.clients(1, "ping", b"") as one:
        rate8, rate1 = ctx.paired(ctx.rounds(eight), ctx.rounds(one))
    return Row(rate8, rate1, "req/s", 3.0, "1 client; keyden: 8 clients")


@benchmark("python-floor")
def python_floor(ctx: Context) -> Row:
    """Reference: the ping-pong floor written in plain Python (bench/pingpong.py) vs the C floor.

    No Python daemon can answer faster than this: it bounds what the ``ping`` target can mean here.
    """
    floor, how = pingpong_floor(ctx)
    n = max(1000, ctx.settings.pingpong_round_trips // 4)
    cmd = [sys.executable, "-m", "bench.pingpong", str(n), "1"]

    def python() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout) / 1e6
    python_s, floor_s = ctx.paired(python, floor)
    return Row(python_s * 1e6, floor_s * 1e6, "µs", None, how + "; row: plain Python, no keyden")


@benchmark("python-echo-8")
def python_echo_8(ctx: Context) -> Row:
    """Reference: a bare Python epoll echo server (bench/echo.py) with 8 clients vs 1.

    The ``concurrency`` row asks keyden for 3x; this is what a server doing nothing at all reaches.
    """
    from bench.echo import EchoServer

    with EchoServer(ctx.workdir) as echo, ClientPool(8, echo.path, None, "ping") as eight, \
            ClientPool(1, echo.path, None, "ping") as one:
        rate8, rate1 = ctx.paired(ctx.rounds(eight), ctx.rounds(one))
    return Row(rate8, rate1, "req/s", None, "1 client; row: 8 clients, plain Python echo, no keyden")


@benchmark("sign-rsa2048")
def sign_rsa2048(ctx: Context) -> Row:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    digest = hashlib.sha256(b"keyden benchmark").digest()
    local = rsa.generate_private_key(65537, 2048)
    scheme = (padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    with ctx.connect() as c:
        serial = c.generate("rsa:2048", "bench-rsa2048")
        keyden_s, local_s = ctx.paired(ctx.calls(lambda: c.pkey_sign(serial, "enc=pkcs1 hash=sha256", digest)),
                                       ctx.calls(lambda: local.sign(digest, *scheme)))
    return Row(keyden_s * 1e6, local_s * 1e6, "µs", 0.85, "pyca, 1 thread")


@benchmark("sign-ed25519-8")
def sign_ed25519_8(ctx: Context) -> Row:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    message = bytes(range(64))
    local = ed25519.Ed25519PrivateKey.generate()
    with ctx.connect() as c:
        serial = c.generate("ed25519", "bench-ed25519")
    with ctx.clients(8, "pkey_sign", serial, "", message) as pool:
        rate, local_s = ctx.paired(ctx.rounds(pool), ctx.calls(lambda: local.sign(message)))
    return Row(rate, 1 / local_s, "sig/s", 0.6, "pyca, 1 thread; keyden: 8 clients")


@benchmark("python-sign-8")
def python_sign_8(ctx: Context) -> Row:
    """Reference: ``sign-ed25519-8`` against a bare Python epoll server that signs each read on its loop.

    No protocol, permission checks or audit: what the ``sign-ed25519-8`` target allows any Python daemon here.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from bench.echo import EchoServer

    message = bytes(range(64))
    local = ed25519.Ed25519PrivateKey.generate()
    with EchoServer(ctx.workdir, sign=True) as server, \
            ClientPool(8, server.path, None, "pkey_sign", (0, "", message)) as pool:
        rate, local_s = ctx.paired(ctx.rounds(pool), ctx.calls(lambda: local.sign(message)))
    return Row(rate, 1 / local_s, "sig/s", None, "pyca, 1 thread; row: 8 clients, plain Python server, no keyden")


def _busy_vs_idle(ctx: Context, fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds per ``fn()`` while another process keeps a second CPU busy, and with it idle (bench/spinner.py)."""
    from bench.spinner import Spinner

    busy_calls, idle_calls = ctx.calls(fn), ctx.calls(fn)
    with Spinner() as spinner:
        def busy() -> float:
            with spinner.busy():
                return busy_calls()
        return ctx.paired(busy, idle_calls)


@benchmark("busy-cpu-sign")
def busy_cpu_sign(ctx: Context) -> Row:
    """Reference: pyca Ed25519 signing in this process with a second CPU kept busy, vs idle.

    Rows with client processes keep both CPUs busy; their in-process baselines run with the second one
    idle.  Where two vCPUs share a physical core, this is what that alone costs OpenSSL's code.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519

    message = bytes(range(64))
    local = ed25519.Ed25519PrivateKey.generate()
    busy_s, idle_s = _busy_vs_idle(ctx, lambda: local.sign(message))
    return Row(1 / busy_s, 1 / idle_s, "sig/s", None, "pyca, 1 thread; row: the same with another CPU kept busy")


@benchmark("busy-cpu-python")
def busy_cpu_python(ctx: Context) -> Row:
    """Reference: the daemon's Python work for one ping (``Connection.receive``, no socket) with a second
    CPU kept busy, vs idle: what the same sharing costs interpreted code, keyden's per-request work."""
    from bench.profile_request import InProcess

    daemon = InProcess()
    daemon.ping(b"")
    request = daemon.last_request
    busy_s, idle_s = _busy_vs_idle(ctx, lambda: daemon.conn.receive(request))
    return Row(busy_s * 1e6, idle_s * 1e6, "µs", None, "keyden's request handling in this process, other CPU idle; "
               "row: the same with another CPU kept busy")


@benchmark("tls-handshake")
def tls_handshake(ctx: Context) -> Row:
    """Full handshakes (TLS 1.3, ECDSA P-256, no resumption) served by keyden vs by an in-process ssl server."""
    from bench import tls

    pki = tls.Pki()
    client_ctx = pki.client_context()
    with ctx.connect() as c:
        ring = c.newring("bench-tls-handshake")
        c.add("asymmetric", "", pki.cert_pem, ring)
        c.add("asymmetric", "", pki.key_pem, ring)
        with tls.KeydenServer(c, ring, tls.acknowledge) as ours, \
                tls.LocalServer(pki.local_context(), tls.acknowledge) as local:
            keyden_s, local_s = ctx.paired(ctx.calls(lambda: tls.handshake(client_ctx, ours.port)),
                                           ctx.calls(lambda: tls.handshake(client_ctx, local.port)))
    return Row(1 / keyden_s, 1 / local_s, "handshakes/s", 0.7, "Python ssl server thread")


@benchmark("tls-bulk")
def tls_bulk(ctx: Context) -> Row:
    """1 MiB through an established TLS connection: keyden's record layer and socketpair vs in-process ssl."""
    from bench import tls

    data = os.urandom(1 << 20)
    pki = tls.Pki()
    client_ctx = pki.client_context()
    with ctx.connect() as c:
        ring = c.newring("bench-tls-bulk")
        c.add("asymmetric", "", pki.cert_pem, ring)
        c.add("asymmetric", "", pki.key_pem, ring)
        with tls.KeydenServer(c, ring, tls.sink(len(data))) as ours, \
                tls.LocalServer(pki.local_context(), tls.sink(len(data))) as local:
            to_keyden, to_local = tls.Sender(client_ctx, ours.port, data), tls.Sender(client_ctx, local.port, data)
            try:
                keyden_s, local_s = ctx.paired(ctx.calls(to_keyden), ctx.calls(to_local))
            finally:
                to_keyden.close()
                to_local.close()
    return Row(1 / keyden_s, 1 / local_s, "MiB/s", 0.5, "Python ssl server thread")


def _aead_bulk(ctx: Context, size: int, target: float) -> Row:
    """AES-256-GCM by serial through shared memory, in place (nothing over the socket) vs in-process pyca."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    # One fixed nonce for every repetition: fine for timing, never for real data.
    nonce = bytes(12)
    data = os.urandom(size)
    local, out = AESGCM(AESGCM.generate_key(256)), bytearray(size + 16)
    with ctx.connect() as c:
        key = c.generate("aes:256", f"bench:aead-{size}", "@s")
        with c.shared_buffer(2 * size + 64) as shm:
            shm.view[:size] = data
            keyden_s, local_s = ctx.paired(
                ctx.calls(lambda: shm.cipher("gcm(aes)", key, 0, size, size, iv=nonce)),
                ctx.calls(lambda: local.encrypt_into(nonce, data, None, out)))
    return Row(size / keyden_s / 2**20, size / local_s / 2**20, "MiB/s", target, "pyca, 1 thread")


@benchmark("aead-16MiB")
def aead_16mib(ctx: Context) -> Row:
    return _aead_bulk(ctx, 16 << 20, 0.9)


@benchmark("aead-1MiB")
def aead_1mib(ctx: Context) -> Row:
    return _aead_bulk(ctx, 1 << 20, 0.5)


PIPELINED = 8  # 1 MiB calls aead-1MiB-x8 sends at once


@benchmark("aead-1MiB-x8")
def aead_1mib_x8(ctx: Context) -> Row:
    """8 AES-256-GCM calls of 1 MiB each sent at once (SharedBuffer.cipher_many) vs 8 in-process calls,
    each side over 8 distinct inputs into 8 distinct outputs (the same 16 MiB working set: re-encrypting
    one cache-warm MiB runs ~20 % faster here)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    size, n = 1 << 20, PIPELINED
    nonce = bytes(12)  # fixed, as in _aead_bulk: fine for timing, never for real data
    data = [os.urandom(size) for _ in range(n)]
    local, outs = AESGCM(AESGCM.generate_key(256)), [bytearray(size + 16) for _ in range(n)]
    ranges = [(i * size, size, n * size + i * (size + 16)) for i in range(n)]
    with ctx.connect() as c:
        key = c.generate("aes:256", "bench:aead-pipelined", "@s")
        with c.shared_buffer(2 * n * size + n * 16) as shm:
            for i in range(n):
                shm.view[i * size:(i + 1) * size] = data[i]
            done = shm.cipher_many("gcm(aes)", key, ranges, ivs=[nonce] * n)
            if done != [(size + 16, b"")] * n:  # (errors come back as values: time them, never)
                raise RuntimeError(f"cipher_many failed: {done}")
            keyden_s, local_s = ctx.paired(
                ctx.calls(lambda: shm.cipher_many("gcm(aes)", key, ranges, ivs=[nonce] * n)),
                ctx.calls(lambda: [local.encrypt_into(nonce, d, None, o) for d, o in zip(data, outs)]))
    return Row(n * size / keyden_s / 2**20, n * size / local_s / 2**20, "MiB/s", 0.5, "pyca, 1 thread")


BATCH_ITEMS = [os.urandom(64) for _ in range(256)]  # 256 messages of 64 bytes for the batch rows


@benchmark("batch-hmac-64B")
def batch_hmac_64b(ctx: Context) -> Row:
    """256 HMAC-SHA256 tags in one request vs one pyca HMAC object per item."""
    from cryptography.hazmat.primitives import hashes, hmac

    local_key = os.urandom(32)

    def local_batch() -> list[bytes]:
        tags = []
        for item in BATCH_ITEMS:
            h = hmac.HMAC(local_key, hashes.SHA256())
            h.update(item)
            tags.append(h.finalize())
        return tags

    with ctx.connect() as c:
        m = c.hmac(c.generate("hmac:256", "bench:mac", "@s"))
        keyden_s, local_s = ctx.paired(ctx.calls(lambda: m.mac_batch(BATCH_ITEMS)), ctx.calls(local_batch))
    n = len(BATCH_ITEMS)
    return Row(n / keyden_s, n / local_s, "items/s", 0.3, "pyca, 1 thread")


@benchmark("batch-aead-64B")
def batch_aead_64b(ctx: Context) -> Row:
    """256 AES-256-GCM encryptions (distinct nonces) in one request vs pyca AESGCM.encrypt per item."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonces = [i.to_bytes(12, "big") for i in range(len(BATCH_ITEMS))]
    local = AESGCM(AESGCM.generate_key(256))
    with ctx.connect() as c:
        a = c.aead(c.generate("aes:256", "bench:aead-batch", "@s"))
        keyden_s, local_s = ctx.paired(
            ctx.calls(lambda: a.encrypt_batch(nonces, BATCH_ITEMS)),
            ctx.calls(lambda: [local.encrypt(n, item, None) for n, item in zip(nonces, BATCH_ITEMS)]))
    n = len(BATCH_ITEMS)
    return Row(n / keyden_s, n / local_s, "items/s", 0.3, "pyca, 1 thread")


def pingpong_floor(ctx: Context) -> tuple[Sampler, str]:
    """Seconds per 1-byte round trip between two processes: bench/pingpong.c, or its Python twin."""
    n = ctx.settings.pingpong_round_trips
    here = os.path.dirname(os.path.abspath(__file__))
    compiler = os.environ.get("CC") or shutil.which("cc")
    exe = os.path.join(ctx.workdir, "pingpong")
    built = compiler and subprocess.run([compiler, "-O2", "-o", exe, os.path.join(here, "pingpong.c")],
                                        capture_output=True).returncode == 0
    if built:
        cmd, how = [exe, str(n), "1"], "C floor, cc -O2"
    else:
        cmd, how = [sys.executable, "-m", "bench.pingpong", str(n // 4), "1"], "Python floor: no C compiler"

    def sample() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout) / 1e6
    return sample, how


# ----------------------------------------------------------------- reporting

def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import ssl

    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu or platform.machine(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cryptography": cryptography.__version__,
        "cryptography OpenSSL": backend.openssl_version_text(),
        "ssl module OpenSSL": ssl.OPENSSL_VERSION,
        "cpuidle": cpuidle(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def cpuidle() -> str:
    """How an idle CPU waits: what a wake-up costs, so what every row with a round trip pays.

    In a VM whose guest does not poll before halting (haltpoll's guest_halt_poll_ns = 0), each
    wake-up of an idle vCPU goes through the hypervisor: the ping-pong floor then measures that."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    base = "/sys/devices/system/cpu/cpuidle/"
    governor = read(base + "current_governor") or read(base + "current_governor_ro")
    if not governor:
        return "unknown"
    described = f"{governor} governor, {read(base + 'current_driver') or 'no'} driver"
    halt_poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") if governor == "haltpoll" else ""
    if halt_poll:
        described += f", guest_halt_poll_ns {halt_poll}"
        if halt_poll == "0":
            described += " (no polling: every wake-up of an idle vCPU exits to the host)"
    return described


def busy(info: dict[str, str]) -> bool:
    """Was the machine loaded (1-minute load average over half its CPUs) when the run started?"""
    return float(info["load average at start"].split()[0]) > int(info["nproc"]) / 2


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table_line(name: str, row: Row) -> str:
    baseline = f"{fmt(row.baseline)} {row.unit}" + (f" ({row.note})" if row.note else "")
    if row.target is None:
        return f"| {name} | {fmt(row.keyden)} {row.unit} | {baseline} | {row.ratio:.2f} | reference | — |"
    return (f"| {name} | {fmt(row.keyden)} {row.unit} | {baseline} | {row.ratio:.2f} | ≥ {row.target:.2f} | "
            f"{'yes' if row.ratio >= row.target else 'NO'} |")


def render(info: dict[str, str], results: dict[str, Row | str], quick: bool) -> str:
    lines = [f"keyden benchmarks{' (quick: figures are rough)' if quick else ''}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if busy(info):
        lines += ["", "WARNING: other work was running on this machine; figures are unreliable."]
    lines += ["", RATIO_CONVENTION, "", TABLE_HEADER]
    for name, row in results.items():
        lines.append(table_line(name, row) if isinstance(row, Row) else f"| {name} | error: {row} | | | | NO |")
    return "\n".join(lines)


def as_json(info: dict[str, str], results: dict[str, Row | str], quick: bool) -> dict:
    def entry(row: Row | str) -> dict:
        if not isinstance(row, Row):
            return {"error": row}
        return {**row._asdict(), "ratio": row.ratio,
                "met": None if row.target is None else row.ratio >= row.target}
    return {"machine": info, "quick": quick, "ratio": RATIO_CONVENTION,
            "results": {name: entry(row) for name, row in results.items()}}


# ----------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs for a smoke test (< 20 s); rough figures")
    p.add_argument("--only", help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--busy-poll", metavar="USEC", type=int, default=0,
                   help="the daemon (config busy_poll) and the benchmark's own client busy-poll for this long "
                        "(not the client processes of the pool rows: they outnumber the CPUs); default 0, off")
    args = p.parse_args(argv)
    if not 0 <= args.busy_poll <= MAX_BUSY_POLL:
        p.error(f"--busy-poll takes 0 to {MAX_BUSY_POLL} µs")
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(BENCHMARKS)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def run(names: list[str], settings: Settings, busy_poll: int = 0) -> dict[str, Row | str]:
    results: dict[str, Row | str] = {}
    workdir = tempfile.mkdtemp(prefix="keyden-bench-build-")
    try:
        with BenchDaemon(config=f"busy_poll = {busy_poll}\n" if busy_poll else "") as daemon:
            with keyden.connect(daemon.socket) as boot:
                _serial, session = boot.join_session()
            ctx = Context(daemon.socket, session, settings, workdir, busy_poll)
            watchdog = Watchdog()
            for name in names:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    with watchdog.limit(settings.time_limit):
                        results[name] = Row(*BENCHMARKS[name](ctx))
                except Exception as exc:
                    traceback.print_exc()
                    if daemon.proc.poll() is not None:
                        print(f"keyden exited with status {daemon.proc.returncode}; its log:\n{daemon.read_log()}",
                              file=sys.stderr)
                    results[name] = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
                print(f"  {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    info["busy polling"] = (f"{args.busy_poll} µs (the daemon, and the benchmark's own client; not the pools' "
                            "client processes)" if args.busy_poll else "off (the default)")
    results = run(args.names, QUICK if args.quick else FULL, args.busy_poll)
    print(render(info, results, args.quick))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_json(info, results, args.quick), f, indent=2)
            f.write("\n")
    return 1 if any(not isinstance(r, Row) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
