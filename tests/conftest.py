"""Shared fixtures: a real daemon on a temporary socket, clients with their own session keyring."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import keyden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eventually(condition, timeout: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds: for what the daemon does just after it
    answers (a descriptor a client sent is closed on its closer thread, keyden.descriptors)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def default_hangup_and_term() -> None:
    """A preexec_fn: the signals tests send at their default in the child, whatever the suite inherited
    (under nohup SIGHUP is ignored, and a shell starts a background job with SIGINT and SIGQUIT ignored;
    keyden, as it should, goes on ignoring them): for tests of what they do."""
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


class Daemon:
    """A `keyden serve` subprocess on a socket in a world-traversable temp dir (other uids connect too)."""

    def __init__(self, extra_config: str = "", args: tuple[str, ...] = (), program: tuple[str, ...] = ("-m", "keyden"),
                 env: dict[str, str] | None = None):
        """``program``: what follows the interpreter, ``serve`` and its options after it (``-c`` with code that
        injects a fault, then runs keyden.cli.main); ``env``: variables added to the environment."""
        self.program, self.env = program, env or {}
        self.dir = tempfile.mkdtemp(prefix="keyden-test-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "keyden.sock")
        self.state_dir = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "keyden.toml")
        with open(self.config, "w") as f:
            f.write(extra_config)
        self.args = args
        self.log = os.path.join(self.dir, "daemon.log")
        self.proc: subprocess.Popen | None = None

    def start(self, **popen) -> "Daemon":
        """Start and wait until it answers; ``popen`` goes to subprocess.Popen (preexec_fn=...)."""
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env)
        env.pop("KEYDEN_SESSION", None)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.program, "serve", "--socket", self.socket, "--state-dir", self.state_dir,
             "--config", self.config, *self.args],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, **popen)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.read_log()}")
            try:
                keyden.connect(self.socket).close()
                return self
            except keyden.KeydenError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not start:\n{self.read_log()}")

    def read_log(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def connect(self, **kw) -> keyden.client.sync.Client:
        return keyden.connect(self.socket, **kw)

    def memory_kib(self, field: str = "VmRSS") -> int:
        """The daemon's resident memory (or VmHWM, its peak so far) from /proc/<pid>/status, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self, sig: int | None = None) -> None:
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_logf", None):
            self._logf.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon():
    d = Daemon().start()
    yield d
    d.cleanup()


@pytest.fixture
def fresh_daemon():
    """A daemon of the test's own, for tests that change global state or kill it."""
    made = []

    def make(extra_config: str = "", args: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(extra_config, args).start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def client(daemon):
    """A client in a session keyring of its own, so tests do not see each other's keys."""
    with daemon.connect() as boot:
        _serial, token = boot.join_session()
    c = daemon.connect(session=token)
    c.session_token = token
    yield c
    try:
        c.clear("@s")
        c.leave_session(token)
    except keyden.KeydenError:
        pass
    c.close()
