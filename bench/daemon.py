"""A private `keyden serve` for one benchmark run: temp socket and state dir, removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import keyden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchDaemon:
    """Starts the daemon as users run it (same flags, hardening on), waits until it answers."""

    def __init__(self, command: tuple[str, ...] = ("-m", "keyden", "serve"), startup_timeout: float = 20.0,
                 config: str = ""):
        """``config``: TOML settings for the daemon (none: its defaults)."""
        self.command = command  # what follows the interpreter; the serve flags are appended
        self.config = config
        self.dir = tempfile.mkdtemp(prefix="keyden-bench-")
        self.socket = os.path.join(self.dir, "keyden.sock")
        self.log = os.path.join(self.dir, "daemon.log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "BenchDaemon":
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("KEYDEN_SESSION", None)
        flags = ["--socket", self.socket, "--state-dir", os.path.join(self.dir, "state"), "--log-level", "WARNING"]
        if self.config:  # 0600 whatever the umask: the daemon refuses a config file others may write
            path = os.path.join(self.dir, "keyden.toml")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(self.config)
            flags += ["--config", path]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.command, *flags],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            self._wait_until_up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyden exited during startup:\n{self.read_log()}")
            try:
                keyden.connect(self.socket).close()
                return
            except keyden.KeydenError:
                time.sleep(0.05)
        raise RuntimeError(f"keyden did not start within {self.startup_timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
