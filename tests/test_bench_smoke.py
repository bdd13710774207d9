"""The benchmark harness runs end to end (in its quick mode) and reports a ratio per benchmark.

Only the shape of the report is checked: performance is judged by reading `python -m bench.run`,
never by timing assertions in tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "| benchmark | keyden | in-process baseline | ratio | target | met |"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KEYDEN_SESSION", None)
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_quick_ping_prints_a_table_with_a_ratio(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = run_bench("--quick", "--only", "ping", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert HEADER in lines
    assert any(line.startswith("- cryptography OpenSSL: ") for line in lines)
    rows = [line for line in lines if line.startswith("| ping |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert re.fullmatch(r"\d+\.\d\d", cells[3]), cells  # the ratio column holds a number
    assert cells[5] in ("yes", "NO")
    result = json.loads(out_json.read_text())["results"]["ping"]
    assert result["unit"] == "µs" and result["keyden"] > 0 and result["baseline"] > 0
    assert f"{result['ratio']:.2f}" == cells[3]


def test_unknown_benchmark_is_refused_with_the_choices():
    proc = run_bench("--quick", "--only", "no-such-bench")
    assert proc.returncode == 2
    assert "no-such-bench" in proc.stderr and "sign-rsa2048" in proc.stderr
    proc = run_bench("--quick", "--only", "ping", "--busy-poll", "10001")
    assert proc.returncode == 2 and "--busy-poll takes 0 to 10000 µs" in proc.stderr


def test_a_bench_daemon_takes_its_settings_whatever_the_umask():
    """--busy-poll reaches the daemon in a config file, which must be 0600 even under umask 002: the
    daemon refuses a config file others may write."""
    import keyden
    from bench.daemon import BenchDaemon

    old = os.umask(0o002)
    try:
        with BenchDaemon(config="busy_poll = 50\n") as d:
            assert os.stat(os.path.join(d.dir, "keyden.toml")).st_mode & 0o777 == 0o600
            with keyden.connect(d.socket) as c:
                assert c.ping(b"set") == b"set"
    finally:
        os.umask(old)


def test_profile_request_reports_both_sides():
    """bench.profile_request drives the real client against a canned socket: it must keep up with the client."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KEYDEN_SESSION", None)
    proc = subprocess.run([sys.executable, "-m", "bench.profile_request", "--calls", "300", "--top", "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "client Python (canned socket)" in proc.stdout
    assert "daemon I/O loop, cProfile" in proc.stdout
