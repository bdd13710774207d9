"""The keyctl-compatible command line, run as a real subprocess against a real daemon.

Each test runs `python -m keyden` inside the test's own session keyring
(KEYDEN_SESSION from the ``client`` fixture) and checks keyctl's exact
output and exit codes.  Subprocesses cost ~0.2 s each, so tests group
related checks.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyden import errors as E
from keyden.cli import commands
from keyden.server.handlers import keyctl as keyctl_handlers
from tests.conftest import REPO

UID, GID = os.geteuid(), os.getegid()
KEYDEN = f"{shlex.quote(sys.executable)} -m keyden"  # for shell commands run inside `keyden session`


@dataclass
class Result:
    rc: int
    stdout: bytes
    err: str

    @property
    def out(self) -> str:
        return self.stdout.decode()


@pytest.fixture
def keyden(daemon, client):
    """Run the CLI in the test's session: keyden("add", "user", ...) -> Result."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KEYDEN_SESSION=client.session_token)
    env.pop("KEYDEN_SOCKET", None)

    def run(*args: str, stdin: bytes = b"", session: str | None = None, socket: str | None = None) -> Result:
        run_env = env if session is None else dict(env, KEYDEN_SESSION=session)
        proc = subprocess.run([sys.executable, "-m", "keyden", "--socket", socket or daemon.socket, *args],
                              input=stdin, capture_output=True, env=run_env, timeout=60)
        return Result(proc.returncode, proc.stdout, proc.stderr.decode())

    return run


def ok(result: Result) -> str:
    assert result.rc == 0, result.err
    return result.out


# ------------------------------------------------------------------ table & help


REQUIRED = ("add padd request request2 update pupdate newring revoke invalidate clear link unlink move search "
            "read pipe print list rlist describe rdescribe show chown chgrp setperm timeout session new_session "
            "purge reap restrict_keyring supports id pkey_query pkey_encrypt pkey_decrypt pkey_sign pkey_verify "
            "serve genkey").split()


def test_help_lists_every_command_and_usage_errors_print_the_synopsis(keyden):
    for words in (["--help"], ["help"]):
        out = ok(keyden(*words))
        listed = {line.split()[1] for line in out.splitlines() if line.startswith("  keyden ")}
        assert set(REQUIRED) <= listed
        assert {c.name for c in commands.COMMANDS} <= listed
    bare = keyden()
    assert bare.rc == 2 and bare.err.startswith("Format:\n") and "keyden add " in bare.err

    assert ok(keyden("help", "purge")) == ("Format:\n  keyden purge <type>\n  keyden purge [-p] [-i] <type> <desc>\n"
                                           "  keyden purge -s <type> <desc>\n")
    for word in ("--help", "-h"):  # as `help <command>`: it was a usage error, the synopsis on stderr and 2
        assert ok(keyden("purge", word)) == ok(keyden("help", "purge"))
        assert ok(keyden("aead", word)).startswith("Format:\n  keyden aead encrypt|decrypt <key>")
    assert "--max-connections N" in ok(keyden("tls-proxy", "--help"))  # argparse's, fuller
    for name in ("serve", "init", "tls-proxy"):  # `help <command>` as `<command> --help` (it gave only the synopsis)
        assert ok(keyden("help", name)) == ok(keyden(name, "--help")) and "options:" in ok(keyden("help", name))
    assert "--adopt-orphans" in ok(keyden("help")) and "--adopt-orphans" in ok(keyden("help", "serve"))
    from keyden import __version__
    assert ok(keyden("--version")) == f"keyden {__version__}\n"
    assert keyden("--version", "extra").rc == 2  # a word too many was ignored
    wrong = keyden("describe")  # missing argument
    assert (wrong.rc, wrong.err, wrong.out) == (2, "Format:\n  keyden describe <keyring>\n", "")
    unknown = keyden("frobnicate", "@s")
    assert (unknown.rc, unknown.err) == (2, "Unknown command\n")
    ambiguous = keyden("li", "@s")  # link, list
    assert (ambiguous.rc, ambiguous.err) == (2, "Ambiguous command\n")


def test_options_lead_for_keyctls_commands_and_go_anywhere_for_keydens():
    from keyden.cli.support import Usage, options

    # keyctl's: options lead; the first other word starts the data, even one that looks like an option
    assert options(["-x", "user", "-x", "--no-export"], ("-x", "--no-export")) == (
        {"-x": True}, ["user", "-x", "--no-export"])
    assert options(["--password=p w", "a"], valued=("--password",)) == ({"--password": "p w"}, ["a"])
    # keyden's: anywhere, '--name value' or '--name=value', until '--'
    assert options(["k", "-a", "gcm(aes)", "--contents", "r", "--", "-a", "x"], ("--contents",), ("-a",),
                   anywhere=True) == ({"-a": "gcm(aes)", "--contents": True}, ["k", "r", "-a", "x"])
    for args, anywhere in ((["-a"], True), (["-a"], False), (["k", "-a"], True)):
        with pytest.raises(Usage):  # a valued option without its value
            options(args, valued=("-a",), anywhere=anywhere)



def test_every_one_of_keydens_own_commands_takes_its_options_anywhere_and_a_double_dash(keyden, client):
    """As docs/cli.md says of keyden's own commands: `public_key <key> --der` was a usage error, and
    `hash -- sha256` (and the other commands with no options) refused the '--' (found by a CLI hunt)."""
    key = str(client.generate("ec:p256", "cli:anywhere"))
    der = keyden("public_key", "--der", key)
    assert der.rc == 0 and der.stdout and keyden("public_key", key, "--der").stdout == der.stdout
    assert ok(keyden("public_key", "--", key)).startswith("-----BEGIN PUBLIC KEY-----")
    assert ok(keyden("hash", "--", "sha256", stdin=b"abc")) == ok(keyden("hash", "sha256", stdin=b"abc"))
    assert ok(keyden("x509_hashes", "--", key)) == ok(keyden("x509_hashes", key))
    for command in ("keys", "sessions"):
        assert keyden(command, "--").rc == 0
    assert ok(keyden("help", "--", "hash")).startswith("Format:")

def test_daemon_not_running_is_a_clear_failure(keyden, tmp_path):
    r = keyden("list", "@s", socket=str(tmp_path / "nothing.sock"))
    assert r.rc == 1
    assert "cannot connect to keyden" in r.err and "is the daemon running?" in r.err


# ------------------------------------------------------------- output formats


def test_add_list_rlist_describe_id(keyden, client):
    session = client.get_keyring_id("@s")
    assert ok(keyden("list", "@s")) == "keyring is empty\n"
    assert ok(keyden("rlist", "@s")) == "\n"
    foo = int(ok(keyden("add", "user", "foo", "bar", "@s")))
    assert client.read(foo) == b"bar"
    assert ok(keyden("list", "@s")) == f"1 key in keyring:\n{foo:9d}: --alswrv {UID:5d} {GID:5d} user: foo\n"
    assert ok(keyden("id", "%user:foo")) == f"{foo}\n"

    ring = int(ok(keyden("newring", "sub", "@s")))
    client.setperm(foo, 0x01030000)  # possessor view, user read+view: list shows what *we* are granted
    assert ok(keyden("list", str(session))) == (
        f"2 keys in keyring:\n{foo:9d}: ------rv {UID:5d} {GID:5d} user: foo\n"
        f"{ring:9d}: --alswrv {UID:5d} {GID:5d} keyring: sub\n")
    assert ok(keyden("rlist", "@s")) == f"{foo} {ring}\n"
    assert ok(keyden("describe", "%:sub")) == f"{ring:9d}: alswrv-----v------------ {UID:5d} {GID:5d} keyring: sub\n"
    assert ok(keyden("rdescribe", "%user:foo")) == f"user;{UID};{GID};01030000;foo\n"
    assert ok(keyden("rdescribe", str(foo), "|")) == f"user|{UID}|{GID}|01030000|foo\n"
    e_acute = "\u00e9".encode()  # keyctl takes the separator's first byte, not its first character
    assert keyden("rdescribe", str(foo), "\u00e9").stdout == f"user;{UID};{GID};01030000;foo\n".encode().replace(
        b";", e_acute[:1])
    assert ok(keyden("id", "@s")) == f"{session}\n"
    assert ok(keyden("describe", "@s")).startswith("       -3: alswrv")  # keyctl prints the id as given
    assert ok(keyden("describe", str(2**32 - 3))).startswith("       -3: ")  # ... as a 32-bit key_serial_t
    # A unique prefix selects the command; numbers may be hex, as strtoul reads them.
    assert ok(keyden("desc", hex(foo))) == ok(keyden("describe", str(foo)))
    assert ok(keyden("rli", "-3")) == f"{foo} {ring}\n"  # -3 is @s


def test_read_print_pipe_and_hex_input(keyden, client):
    data = bytes(range(40))
    key = int(ok(keyden("add", "-x", "user", "bin", data.hex(), "@s")))
    assert client.read(key) == data
    assert ok(keyden("read", str(key))) == (
        "40 bytes of data in key:\n"
        "00010203 04050607 08090a0b 0c0d0e0f 10111213 14151617 18191a1b 1c1d1e1f\n"
        "20212223 24252627\n")
    assert ok(keyden("print", str(key))) == ":hex:" + data.hex() + "\n"
    assert keyden("pipe", str(key)).stdout == data

    text = int(ok(keyden("padd", "user", "text", "@s", stdin=b"hello world")))
    assert ok(keyden("print", str(text))) == "hello world\n"
    ok(keyden("pupdate", "%user:text", stdin=b"line\n"))
    assert client.read(text) == b"line\n"
    assert ok(keyden("print", str(text))) == ":hex:6c696e650a\n"
    ok(keyden("update", "-x", str(text), "de ad\nbe ef"))  # whitespace between hex pairs is ignored
    assert client.read(text) == b"\xde\xad\xbe\xef"
    ok(keyden("pupdate", "-x", str(text), stdin=b"41 42\n"))
    assert keyden("pipe", str(text)).stdout == b"AB"
    padded = int(ok(keyden("padd", "-x", "user", "hx", "@s", stdin=b"0001")))
    assert client.read(padded) == b"\x00\x01"
    bad = keyden("add", "-x", "user", "bad", "abc", "@s")
    assert (bad.rc, bad.err) == (1, "Short hex doublet\n")
    split = keyden("add", "-x", "user", "bad", "d e", "@s")  # whitespace inside a pair, as keyctl's hex2bin
    assert (split.rc, split.err) == (1, "Bad hex doublet\n")
    for twice in (("add", "-x", "-x", "user", "hx2", "aa", "@s"), ("update", "-x", "-x", str(text), "41")):
        again = keyden(*twice)  # keyctl takes -x once: the second is a word, one too many
        assert (again.rc, again.err.splitlines()[0]) == (2, "Format:"), twice
    assert client.read(text) == b"AB"


def test_a_description_the_locale_cannot_encode_is_escaped_not_a_traceback(keyden, client, daemon):
    """Under a locale whose encoding lacks a description's characters (ISO-8859-1 and a CA's "E-Tuğra", an
    emoji), the listing stopped half-way with a traceback (found by review)."""
    serial = client.add("user", "emoji😀é", b"v", "@s")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KEYDEN_SESSION=client.session_token, PYTHONIOENCODING="latin-1")
    for args in (["describe", str(serial)], ["list", "@s"], ["show", "@s"], ["rdescribe", str(serial)]):
        proc = subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, *args],
                              capture_output=True, env=env, timeout=60)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, (args, proc.stderr)
        assert "emoji\\U0001f600\xe9".encode("latin-1") in proc.stdout, (args, proc.stdout)


def test_errors_are_keyctl_function_and_strerror(keyden, client):
    missing = keyden("read", "12345")
    assert (missing.rc, missing.out, missing.err) == (1, "", "keyctl_read_alloc: Required key not available\n")
    r = keyden("describe", "@x")
    assert (r.rc, r.err) == (2, "Unknown special key: '@x'\n")
    r = keyden("describe", "abc")
    assert (r.rc, r.err) == (2, "Unparsable key: 'abc'\n")
    notfound = keyden("describe", "%user:nope")
    assert (notfound.rc, notfound.err) == (1, "Can't find 'user:nope'\n")
    assert keyden("describe", "%user").rc == 2
    r = keyden("add", "nosuchtype", "d", "x", "@s")
    assert (r.rc, r.err) == (1, "add_key: No such device\n")
    r = keyden("add", "logon", "nocolon", "x", "@s")
    assert (r.rc, r.err) == (1, "add_key: Invalid argument\n")
    logon = int(ok(keyden("add", "logon", "svc:pw", "secret", "@s")))
    r = keyden("print", str(logon))
    assert (r.rc, r.err, r.out) == (1, "keyctl_read_alloc: Operation not supported\n", "")
    r = keyden("id", "@g")
    assert (r.rc, r.err) == (1, "keyctl_get_keyring_ID: Invalid argument\n")
    r = keyden("setperm", str(logon), "rwx")
    assert (r.rc, r.err) == (2, "Unparsable permissions: 'rwx'\n")
    r = keyden("timeout", str(logon), "1x")
    assert (r.rc, r.err) == (2, "Unparsable timeout: '1x'\n")


# -------------------------------------------------------------------- tree


def test_show_prints_the_session_tree(keyden, client):
    session = client.get_keyring_id("@s")
    ring = client.newring("ring", "@s")
    inner = client.add("user", "inner", b"1", ring)
    last = client.add("user", "last", b"2", "@s")
    deep = client.newring("deep", ring)
    leaf = client.add("user", "leaf", b"3", deep)

    def line(serial, depth_text, type_name, desc):
        return f"{serial:10d} --alswrv  {UID:5d} {GID:5d}  {depth_text}{type_name}: {desc}"

    expected = ["Session Keyring",
                line(session, "", "keyring", "_ses"),
                line(ring, " \\_ ", "keyring", "ring"),
                line(inner, " |   \\_ ", "user", "inner"),
                line(deep, " |   \\_ ", "keyring", "deep"),
                line(leaf, " |       \\_ ", "user", "leaf"),  # ring has a later sibling: its bar runs on
                line(last, " \\_ ", "user", "last")]
    assert ok(keyden("show")).splitlines() == expected
    hexed = ok(keyden("show", "-x", "%:deep")).splitlines()
    assert hexed[0] == "Keyring"
    assert hexed[1].startswith(f"0x{deep:08x} --alswrv") and hexed[1].endswith("  keyring: deep")
    assert hexed[2].startswith(f"0x{leaf:08x} ") and hexed[2].endswith("   \\_ user: leaf")

    client.setperm(inner, 0)  # no view for anyone: show cannot describe it
    assert f"{inner}: key inaccessible (Permission denied)" in ok(keyden("show")).splitlines()


def test_unlink_purge_and_reap_walk_the_session_tree(keyden, client):
    ring_a = client.newring("a", "@s")
    ring_b = client.newring("b", "@s")
    shared = client.add("user", "shared", b"x", ring_a)
    client.link(shared, ring_b)
    client.link(shared, "@s")
    assert ok(keyden("unlink", str(shared))) == "3 links removed\n"
    ok(keyden("link", str(client.add("user", "x", b"1", ring_a)), str(ring_b)))
    r = keyden("unlink", "%user:x", str(ring_b))
    assert r.rc == 0 and client.read(ring_b) == []
    r = keyden("unlink", "%:a", str(ring_b))
    assert (r.rc, r.err) == (1, "keyctl_unlink: No such file or directory\n")

    for ring, desc in ((ring_a, "tok"), (ring_b, "TOKEN"), ("@s", "token2"), ("@s", "other")):
        client.add("user", desc, b"v", ring)
    assert ok(keyden("purge", "-p", "-i", "user", "tok")) == ("user 'tok'\nuser 'TOKEN'\nuser 'token2'\n"
                                                              "purged 3 keys\n")
    assert ok(keyden("purge", "user")) == "purged 2 keys\n"  # 'other' and 'x' in ring a
    client.add("user", "s", b"v", ring_a)
    client.add("user", "s", b"v", ring_b)
    assert ok(keyden("purge", "-s", "user", "s")) == "purged 2 keys\n"
    kept = client.add("user", "kept", b"v", "@s")
    for args in (("user", b"\xff"), ("-i", "user", b"\xff"), ("-p", "user", b"k\xff")):  # argv is bytes, not text
        assert ok(keyden("purge", *args)) == "purged 0 keys\n"
    client.unlink(kept, "@s")
    assert keyden("purge", "-s", "user").rc == 2
    assert keyden("purge", "-p", "user").rc == 2

    # reap removes what cannot be described for reasons other than permission: revoked, expired.
    doomed = client.add("user", "revoked", b"v", ring_a)
    ok(keyden("revoke", str(doomed)))
    r = keyden("describe", str(doomed))
    assert (r.rc, r.err) == (1, "keyctl_describe_alloc: Key has been revoked\n")
    expiring = client.add("user", "expiring", b"v", "@s")
    ok(keyden("timeout", str(expiring), "1"))
    hidden = client.add("user", "hidden", b"v", "@s")
    client.setperm(hidden, 0x3e000000)  # describable by nobody, but alive: reap must keep it
    time.sleep(1.1)
    assert ok(keyden("reap", "-v")) == f"Reap {doomed}\nReap {expiring}\n2 keys reaped\n"
    assert client.read("@s") == [ring_a, ring_b, hidden]
    assert client.read(ring_a) == []


# -------------------------------------------------------------- attributes


def test_keys_shows_every_viewable_key_with_its_time_left_as_proc_keys(keyden, client):
    timed = client.add("user", "kd-keys-timed", b"12345", "@s")
    ok(keyden("timeout", str(timed), "7300"))
    logon = client.add("logon", "kd:keys", b"s3cret!", "@s")
    lines = {line.split()[0]: line for line in ok(keyden("keys")).splitlines()}
    assert lines[f"{timed:08x}"].split()[1:5] == ["I--Q---", "1", "2h", "3f010000"]
    assert lines[f"{timed:08x}"].endswith(" user      kd-keys-timed: 5")
    assert lines[f"{logon:08x}"].split()[3] == "perm" and lines[f"{logon:08x}"].endswith(" kd:keys: 7")
    week = client.add("user", "kd-keys-week", b"x", "@s")
    client.timeout(week, 604799)  # a second short of a week: the kernel shows 6d (keyden rounded up to 1w)
    assert {line.split()[0]: line for line in ok(keyden("keys")).splitlines()}[f"{week:08x}"].split()[3] == "6d"
    r = keyden("keys", "extra")
    assert (r.rc, r.err) == (2, "Format:\n  keyden keys\n")


def test_setperm_chown_chgrp_timeout_move_search_request(keyden, client):
    key = client.add("user", "k", b"v", "@s")
    ok(keyden("setperm", str(key), "0x3f3f0000"))
    assert client.describe(key).perm == 0x3F3F0000
    ok(keyden("setperm", str(key), str(0x3f010000)))
    assert client.describe(key).perm == 0x3F010000
    ok(keyden("setperm", str(key), "07700000000"))  # a leading 0 is octal, as for strtoul
    assert client.describe(key).perm == 0x3F000000
    ok(keyden("setperm", str(key), "0x3f3f0000"))
    ok(keyden("chgrp", str(key), str(GID)))
    ok(keyden("chown", str(key), str(UID)))
    assert (client.describe(key).uid, client.describe(key).gid) == (UID, GID)
    r = keyden("chown", "12345", str(UID))
    assert (r.rc, r.err) == (1, "keyctl_chown: Required key not available\n")
    r = keyden("chown", str(key), "x")
    assert (r.rc, r.err) == (2, "Unparsable uid: 'x'\n")
    high = client.add("user", "high", b"v", "@s")  # ids of 2**31 and more print as the kernel's %d does
    ok(keyden("chown", str(high), "4294967294"))
    ok(keyden("chgrp", str(high), "4294967293"))
    assert ok(keyden("rdescribe", str(high))) == "user;-2;-3;3f010000;high\n"
    assert ok(keyden("describe", str(high))).endswith(" -2    -3 user: high\n")
    ok(keyden("timeout", str(key), "3600"))

    ring = client.newring("dest", "@s")
    assert ok(keyden("search", "@s", "user", "k")) == f"{key}\n"
    assert ok(keyden("search", "@s", "user", "k", str(ring))) == f"{key}\n"
    assert key in client.read(ring)
    assert ok(keyden("request", "user", "k")) == f"{key}\n"
    assert ok(keyden("request2", "user", "k", "callout info")) == f"{key}\n"
    r = keyden("request", "user", "absent")
    assert (r.rc, r.err) == (1, "request_key: Required key not available\n")

    other = client.add("user", "k", b"w", client.newring("elsewhere", "@s"))
    r = keyden("move", str(other), "%:elsewhere", str(ring))
    assert (r.rc, r.err) == (1, "keyctl_move: File exists\n")
    ok(keyden("move", "-f", str(other), "%:elsewhere", str(ring)))
    assert other in client.read(ring) and key not in client.read(ring)

    ok(keyden("invalidate", str(other)))
    assert keyden("describe", str(other)).rc == 1
    ok(keyden("clear", str(ring)))
    assert client.read(ring) == []


def test_restrict_keyring(keyden, client):
    ring = client.newring("locked", "@s")
    ok(keyden("restrict_keyring", str(ring)))
    r = keyden("add", "user", "x", "y", str(ring))
    assert (r.rc, r.err) == (1, "add_key: Operation not permitted\n")
    r = keyden("restrict_keyring", str(ring))
    assert (r.rc, r.err) == (1, "keyctl_restrict_keyring: File exists\n")
    # The typed forms reach the daemon unchanged (a restriction it does not know is its call to refuse).
    typed = keyden("restrict_keyring", "%:open", "user", "whatever")
    assert typed.rc == 1 and typed.err.startswith("Can't find")
    r = keyden("restrict_keyring", str(client.newring("open", "@s")), "nosuchtype", "x")
    assert r.rc == 1 and r.err.startswith("keyctl_restrict_keyring: ")


def test_supports(keyden, client):
    have = set(client.supports())
    out = ok(keyden("supports"))
    lines = out.splitlines()
    assert lines[0] == "have_capabilities=1"
    assert "have_persistent_keyrings=1" in lines
    for name in ("move_key", "key_invalidate", "restrict_keyring", "public_key"):
        assert f"have_{name}={1 if name in have else 0}" in lines
    assert keyden("supports", "move_key").rc == (0 if "move_key" in have else 1)
    assert keyden("supports", "persistent_keyrings").rc == 0
    assert keyden("supports", "no_such_capability").rc == 3
    raw = ok(keyden("supports", "--raw")).strip()
    assert len(raw) == 4 and int(raw[:2], 16) & 0x01
    # what keyden implements, it reports: scripts that check first must find dh_compute
    assert "have_dh_compute=1" in lines and keyden("supports", "dh_compute").rc == 0
    assert int(raw[:2], 16) & 0x04
    assert lines[-3:] == ["have_ns_keyring_name=0", "have_ns_key_tag=0", "have_notify=0"]  # keyctl's names only
    assert have == keyctl_handlers.HAVE  # every capability keyden has is one of the kernel's, and reported


# ---------------------------------------------------------------- sessions


def test_session_runs_a_child_that_possesses_the_session(keyden, client):
    # Possessor-only permissions: the child can read its key only through possession of @s.
    script = (f"k=$({KEYDEN} add user a b @s) && {KEYDEN} setperm $k 0x3f000000 && "
              f"{KEYDEN} print %user:a && {KEYDEN} id @s && echo $k; exit 7")
    r = keyden("session", "mysess", "sh", "-c", script)
    assert r.rc == 7, r.err
    payload, session_id, key = r.out.splitlines()
    assert payload == "b"
    assert r.err == f"Joined session keyring: {session_id}\n"
    assert int(session_id) != client.get_keyring_id("@s")
    # The session was left when the child exited: its keyring and key are gone.
    gone = keyden("describe", key)
    assert (gone.rc, gone.err) == (1, "keyctl_describe_alloc: Required key not available\n")

    for command in (("session", "", "true"), ("new_session", "")):  # the kernel's EINVAL, not anonymous
        empty = keyden(*command)
        assert (empty.rc, empty.err) == (1, "keyctl_join_session_keyring: Invalid argument\n"), command
    anon = keyden("session", "-", "sh", "-c", f"{KEYDEN} rdescribe @s")
    assert anon.rc == 0 and anon.out.startswith("keyring;") and anon.out.endswith(";_ses\n")
    missing = keyden("session", "-", "/nonexistent/program")
    assert (missing.rc, missing.err.splitlines()[-1]) == (1, "/nonexistent/program: No such file or directory")


def test_new_session_prints_serial_and_token(keyden, client):
    serial, assignment = ok(keyden("new_session")).splitlines()
    name, _, token = assignment.partition("=")
    assert name == "KEYDEN_SESSION" and token
    assert ok(keyden("id", "@s", session=token)) == f"{serial}\n"
    key = ok(keyden("add", "user", "in-new", "v", "@s", session=token)).strip()
    assert ok(keyden("rlist", "@s", session=token)) == f"{key}\n"
    assert key not in ok(keyden("rlist", "@s")).split()  # the test's own session is another keyring
    ok(keyden("leave_session", token))
    r = keyden("leave_session", token)
    assert (r.rc, r.err) == (1, "leave_session: Required key not available (no such session)\n")

    # A token lost with its shell: its uid finds the session and ends it by serial.
    lost_serial = ok(keyden("new_session")).splitlines()[0]
    assert f"{lost_serial} _ses" in ok(keyden("sessions")).splitlines()
    assert ok(keyden("end_session", lost_serial)) == ""
    assert f"{lost_serial} _ses" not in ok(keyden("sessions")).splitlines()
    r = keyden("end_session", lost_serial)
    assert (r.rc, r.err) == (1, f"end_session: Required key not available (no session of yours has keyring "
                                f"{lost_serial})\n")

    # Inside a session, @s names it for end_session too.
    inside_serial, assignment = ok(keyden("new_session")).splitlines()
    inside = assignment.partition("=")[2]
    assert ok(keyden("end_session", "@s", session=inside)) == ""
    assert f"{inside_serial} _ses" not in ok(keyden("sessions")).splitlines()

    # A stale token in the environment is said as such, not as a daemon that is down; it can still be left.
    r = keyden("id", "@s", session=inside)
    assert r.rc == 1 and "KEYDEN_SESSION: session token not valid" in r.err and "daemon running" not in r.err
    assert ok(keyden("sessions", session=inside)) == ok(keyden("sessions"))  # about sessions: still works
    fresh_serial, _ = ok(keyden("new_session", session=inside)).splitlines()
    assert f"{fresh_serial} _ses" in ok(keyden("sessions", session=inside)).splitlines()
    assert ok(keyden("end_session", fresh_serial)) == ""
    _serial, assignment = ok(keyden("new_session")).splitlines()
    stale = assignment.partition("=")[2]
    assert ok(keyden("leave_session", session=stale)) == ""  # $KEYDEN_SESSION names the session left
    r = keyden("leave_session", session=stale)
    assert (r.rc, r.err) == (1, "leave_session: Required key not available (no such session)\n")
    r = keyden("leave_session", "")
    assert (r.rc, r.err) == (2, "No session to leave: the token given is empty\n")


# -------------------------------------------------------------- public keys


def test_genkey_and_pkey_operations_through_files(keyden, client, tmp_path):
    key = ok(keyden("genkey", "ec:p256", "signer", "@s")).strip()
    assert ok(keyden("describe", key)).endswith(" asymmetric: signer\n")
    assert ok(keyden("pkey_query", key, "0")) == client.pkey_query(int(key)).keyctl() + "\n"

    digest = tmp_path / "digest"
    digest.write_bytes(hashlib.sha256(b"message").digest())
    sign = keyden("pkey_sign", key, "0", str(digest), "hash=sha256")
    assert sign.rc == 0, sign.err
    sig_file = tmp_path / "sig"
    sig_file.write_bytes(sign.stdout)
    client.public_key(int(key)).verify(sign.stdout, b"message", ec.ECDSA(hashes.SHA256()))  # independent check
    assert ok(keyden("pkey_verify", key, "0", str(digest), str(sig_file), "hash=sha256")) == ""
    other = tmp_path / "other"
    other.write_bytes(hashlib.sha256(b"tampered").digest())
    r = keyden("pkey_verify", key, "0", str(other), str(sig_file), "hash=sha256")
    assert (r.rc, r.err) == (1, "keyctl_pkey_verify: Key was rejected by service\n")

    r = keyden("pkey_sign", key, "0", str(digest), "hash")
    assert (r.rc, r.err) == (2, "Option not in key=val form\n")
    r = keyden("pkey_sign", key, "secret", str(digest))
    assert (r.rc, r.err) == (2, "Password passing is not yet supported\n")
    r = keyden("pkey_sign", key, "0", str(tmp_path / "absent"))
    assert (r.rc, r.err) == (1, f"{tmp_path / 'absent'}: No such file or directory\n")
    r = keyden("pkey_encrypt", key, "0", str(digest))
    assert (r.rc, r.err) == (1, "keyctl_pkey_encrypt: Operation not supported\n")
    user_key = ok(keyden("add", "user", "not-asymmetric", "x", "@s")).strip()
    for command in ("pkey_sign", "pkey_encrypt", "pkey_decrypt"):  # keyctl queries the key first
        r = keyden(command, user_key, "0", str(digest))
        assert (r.rc, r.err) == (1, "keyctl_pkey_query: Operation not supported\n")
    r = keyden("pkey_sign", key, "0", str(digest), "enc=nonsense")
    assert (r.rc, r.err) == (1, "keyctl_pkey_query: Invalid argument\n")
    hidden = ok(keyden("genkey", "ed25519", "hidden", "@s")).strip()
    ok(keyden("setperm", hidden, "0x01000000"))  # view only: no search, so no pkey operation
    for target in ("99999", user_key, hidden):  # the info string is parsed before the key is looked up
        r = keyden("pkey_query", target, "0", "foo=bar")
        assert (r.rc, r.err) == (1, "keyctl_pkey_query: Invalid argument\n"), target
    r = keyden("pkey_sign", "12345", "0", str(tmp_path / "absent"))  # as keyctl: the file is read first
    assert (r.rc, r.err) == (1, f"{tmp_path / 'absent'}: No such file or directory\n")
    assert keyden("pkey_verify", key, "0", str(digest)).rc == 2
    r = keyden("genkey", "dsa:1024", "@s")
    assert r.rc == 1 and r.err.startswith("genkey: Invalid argument (unknown key spec 'dsa:1024'; use one of rsa, ")
    assert "aes[-cbc|-ctr]:128|192|256, aes-gcm-siv:128|256, chacha20 or hmac:BITS)" in r.err  # the symmetric ones too

    rsa = ok(keyden("genkey", "rsa:2048", "@s")).strip()  # description derived by the daemon
    assert "RSA" in ok(keyden("describe", rsa))
    plain = tmp_path / "plain"
    plain.write_bytes(b"attack at dawn")
    enc = keyden("pkey_encrypt", rsa, "0", str(plain), "enc=oaep", "hash=sha256")
    assert enc.rc == 0 and len(enc.stdout) == 256
    cipher = tmp_path / "cipher"
    cipher.write_bytes(enc.stdout)
    assert keyden("pkey_decrypt", rsa, "0", str(cipher), "enc=oaep", "hash=sha256").stdout == b"attack at dawn"


def test_add_encrypted_pkcs8_with_password(keyden, client, tmp_path):
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(b"hunter2"))
    key = ok(keyden("add", "--password", "hunter2", "asymmetric", "mine", pem.decode(), "@s")).strip()
    assert ok(keyden("describe", key)).endswith(" asymmetric: mine\n")
    assert keyden("add", "--password", "wrong", "asymmetric", "mine2", pem.decode(), "@s").rc == 1
    assert keyden("add", "asymmetric", "mine3", pem.decode(), "@s").rc == 1
    password_file = tmp_path / "pw"
    password_file.write_bytes(b"hunter2\n")
    key2 = ok(keyden("padd", "--password-file", str(password_file), "asymmetric", "", "@s", stdin=pem)).strip()
    expected_spki = private.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    assert client.public_key_bytes(int(key2))[0] == expected_spki
    # Found by review: with both, the file won silently; with a key no password unlocks, it was dropped.
    both = keyden("padd", "--password", "wrong", "--password-file", str(password_file), "asymmetric", "", "@s",
                  stdin=pem)
    assert both.rc == 2 and "--password or --password-file, not both" in both.err
    for kind, data in (("user", "v"), ("logon", "v"), ("keyring", "")):
        unused = keyden("add", "--password", "x", kind, "cli:pw-" + kind, data, "@s")
        assert unused.rc == 1 and unused.err == "add_key: Invalid argument\n"  # keyctl's form
        with pytest.raises(E.EINVAL, match=f"a password is for an encrypted private key, not a {kind} key"):
            client.add(kind, "cli:pw-" + kind, data.encode(), "@s", password="x")


def test_public_key_gives_openssl_what_it_needs_to_verify(keyden, tmp_path):
    """keyden's own `public_key`: the SPKI PEM (or DER, or the certificate) of a key whose private half never
    leaves; openssl verifies keyden's signature with it, without keyden."""
    key = ok(keyden("genkey", "ec:p256", "kd-public", "@s")).strip()
    pem = ok(keyden("public_key", key))
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "digest").write_bytes(hashlib.sha256(b"hello").digest())
    signature = keyden("pkey_sign", key, "0", str(tmp_path / "digest"), "hash=sha256")
    assert signature.rc == 0, signature.err
    (tmp_path / "sig").write_bytes(signature.stdout)
    verified = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
                               "-in", str(tmp_path / "digest"), "-sigfile", str(tmp_path / "sig")],
                              capture_output=True, text=True)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout
    der = keyden("public_key", "--der", key).stdout
    assert serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode() == pem
    no_cert = keyden("public_key", "--cert", key)
    assert no_cert.rc == 1 and no_cert.err.startswith("public_key: No data available (the key has no certificate")
    user = ok(keyden("add", "user", "kd-not-asymmetric", "x", "@s")).strip()
    refused = keyden("public_key", user)
    assert refused.rc == 1 and "Operation not supported" in refused.err


def test_hostile_words_are_usage_errors_not_tracebacks(keyden, client, tmp_path):
    """Found by fuzzing every command: each of these ended in a Python traceback, read without end, or
    did something else than the docs say."""
    key = str(client.generate("ec:p256", "cli:fuzz"))
    nines = "9" * 4301  # past int()'s 4300 digits
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    cases = [
        (("describe", nines), 1, "Required key not available"),  # strtoul saturates, as in C
        (("describe", b"k\xff"), 2, "Unparsable key: 'k\\xff'"),  # the byte given, not Python's '\udcff'
        (("describe", "-" + nines), 1, "Required key not available"),  # at ULONG_MAX too, not at 1
        (("x509_verify", key, "@s", "--at", "\u00b2"), 2, "Unparsable time"),
        (("x509_verify", key, "@s", "--at", nines), 2, "Out of range time"),
        # Found by a docs walk: one bound for --at, keyden's own options' numbers range-checked, and
        # genkey's options anywhere, as for keyden's other commands
        (("x509_verify", key, "@s", "--at", "999999999999"), 2, "Out of range time: '999999999999' (0 to 253402300799"),
        (("x509_verify", key, "@s", "--at", "9999-12-31T23:00:00-05:00"), 2, "Out of range time"),
        # Found by a docs walk: Unix seconds before 1970, and ISO times whose fraction of a second took them
        # to 0, which is now
        (("x509_verify", key, "@s", "--at", "-5"), 2, "Time before 1970: '-5'"),
        (("x509_verify", key, "@s", "--at", "1969-12-31T23:59:59.5"), 2, "Time before 1970"),
        (("x509_verify", key, "@s", "--at", "1970-01-01T00:00:00.5"), 2, "Time in the epoch's first second"),
        # and by a review of that: a float timestamp rounded the last second of 9999 past it, and int() took
        # no more than 4300 digits, leading zeros included (a traceback)
        (("x509_verify", key, "@s", "--at", "9999-12-31T23:59:59.99999-00:01"), 2, "Out of range time"),
        (("x509_verify", key, "@s", "--at", "0" * 5000 + "99999999999999"), 2, "Out of range time: '00000"),
        (("x509_verify", key, "@s", "--at", "-" + "0" * 5000 + "1"), 2, "Time before 1970: '-0000"),
        (("kdf", key, "@s", "--length", "-1"), 2, "Out of range length: '-1' (16 to 8160)"),
        (("kdf", key, "@s", "--length", "8161"), 2, "Out of range length"),
        (("kdf", key, "@s", "--length", "15"), 2, "Out of range length: '15' (16 to 8160)"),  # (session-keys.md)
        (("kdf", key, "@s", "--length="), 2, "Unparsable length: ''"),
        (("derive", key, key, "@s", "--timeout", ""), 2, "Unparsable timeout: ''"),
        (("genkey", "ec:p256", "x", "@s", "--use", "bogus"), 2, "unknown use 'bogus'"),
        (("tls-proxy", "--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", "127.0.0.1:9", "--alpn", ","),
         2, "--alpn takes protocol names"),
        (("tls-proxy", "--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", "127.0.0.1:9",
          "--max-connections", "99999999999"), 2, "--max-connections takes a number of connections, 1 to 262144"),
        (("tls-proxy", "--listen", "127.0.0.1:\u00b2", "--keyring", "@s", "--forward", "127.0.0.1:9"), 2, "HOST:PORT"),
        (("tls-proxy", "--listen", b"\xff:1", "--keyring", "@s", "--forward", "127.0.0.1:9"), 2, "HOST:PORT"),
        (("tls-proxy", "--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", "127.0.0.1:9", "--alpn", b"\xff"),
         2, "--alpn takes protocol names"),
        (("tls-proxy", "--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", "127.0.0.1:9",
          "--client-trust", ""), 2, "--client-trust takes a keyring"),
        (("pkey_query", key, "0", b"enc=\xff"), 2, "not valid text"),
        (("pkey_sign", key, "0", "/dev/zero", "hash=sha256"), 1, "more than 16781312 bytes"),  # one frame's worth
        (("-",), 2, "Unknown command"),
        (("--", "list", "@s"), 2, "Unknown command"),
        (("aead", "encrypt", str(client.genkey("aes:256", "cli:fuzz-aead", "@s")), "-o", ""), 2,
         "-o takes a file name"),
        (("aead", "encrypt", "%logon:cli:fuzz-aead", "-o", "/dev/fd/77"), 1, "/dev/fd/77: No such file or directory"),
        (("rekey", "--passphrase-file", str(empty)), 1, "must hold 1..4096 bytes"),
        # Empty values taken for "not given" (found by review): --host "" verified for no name at all,
        # --peer-file "" fell back on the peer argument; the files failed as ": No such file", status 1.
        (("x509_verify", key, "@s", "--host", ""), 2, "--host takes a host name, not an empty string"),
        (("derive", key, key, "@s", "--peer-file", ""), 2, "--peer-file takes a file name, not an empty string"),
        (("padd", "--password-file", "", "asymmetric", "x", "@s"), 2, "--password-file takes a file name"),
        (("rekey", "--passphrase-file", ""), 2, "--passphrase-file takes a file name"),
        (("export", key, "--to-public-key", ""), 2, "--to-public-key takes a file name"),
        (("import", "", "--unwrap-with", key, "@s"), 2, "import takes a file name (or - for stdin)"),
    ]
    for args, rc, said in cases:
        result = keyden(*args)
        assert result.rc == rc and said in result.err and "Traceback" not in result.err, (args, result)
    long_path = "/tmp/" + "x" * 120
    result = keyden("id", "@s", socket=long_path)
    assert result.rc == 1 and "None" not in result.err and "too long" in result.err, result
    result = keyden("id", "@s", session=b"\xff".decode(errors="surrogateescape"))
    assert result.rc == 1 and "KEYDEN_SESSION: session token not valid" in result.err, result
    for command in (("--socket", "", "id", "@s"), ("serve", "--state-dir", "")):
        proc = subprocess.run([sys.executable, "-m", "keyden", *command], capture_output=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 2 and b"empty string" in proc.stderr, (command, proc)


def test_a_server_that_is_not_keyden_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A socket whose server accepts and never answers held the client for good; one that announced a
    2 GiB frame had it wait for 2 GiB.  The HELLO's answer is awaited for HELLO_TIMEOUT, and capped."""
    import socket as socketlib
    import threading

    import keyden
    from keyden.client import common

    monkeypatch.setattr(common, "HELLO_TIMEOUT", 0.5)
    for reply in (b"", (0x7FFFFFFF).to_bytes(4, "little") + bytes(12)):
        path = str(tmp_path / f"fake{len(reply)}.sock")
        server = socketlib.socket(socketlib.AF_UNIX)
        server.bind(path)
        server.listen()
        held = []

        def serve():
            conn, _ = server.accept()
            held.append(conn)
            conn.sendall(reply)
        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises((E.ETIMEDOUT, E.EPROTO)) as refused:
            keyden.connect(path)
        assert ("no answer within 0.5 s" if not reply else "what keyden never sends") in str(refused.value)
        server.close()
        for conn in held:
            conn.close()


def test_at_takes_the_last_second_of_9999_and_the_first_after_the_epoch_exactly():
    """(A float timestamp rounded 23:59:59.99999 up, past the last second: Out of range time.)"""
    from keyden.cli.trust import LAST_SECOND, unix_time

    assert unix_time("9999-12-31T23:59:59.99999") == unix_time(str(LAST_SECOND)) == LAST_SECOND
    assert unix_time("1970-01-01T00:00:01.999999") == unix_time("0" * 5000 + "1") == 1
    assert unix_time("1970-01-01T01:00:01+01:00") == 1
