"""Daemon configuration: defaults that work with no set-up, overridable by file, env and flags."""

from __future__ import annotations

import logging
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from keyden import errors as E
from keyden.core.key import StoreConfig
from keyden.errors import StartupError
from keyden.persist.files import make_dirs, require_own, require_safe_parents
from keyden.protocol import DEFAULT_MAX_FRAME, HEADER_SIZE
from keyden.protocol.transport import MAX_BUSY_POLL, default_socket_path

log = logging.getLogger("keyden.config")

DEFAULT_CONFIG_TEXT = """\
# keyden daemon configuration (created on first start; every setting optional).
# state_dir = "/var/lib/keyden"  # keys.db, master.key, audit.log (not root: $XDG_STATE_HOME/keyden); set here,
#                               #   the daemon uses another directory: copy keys.db and master.key there first
# socket = "/run/keyden/keyden.sock"  # (not root: $XDG_RUNTIME_DIR/keyden.sock, if set; $KEYDEN_SOCKET first)
# max_frame = 16781312          # bytes in one frame body
# max_connections = 1024        # all uids together
# max_connections_per_uid = 256
# receive_maxbytes = 268435456  # large frames (over 64 KiB) being received for one uid at once; more wait
# receive_total_maxbytes = 1073741824   # ... and for all uids together
# max_in_flight = 64            # pipelined requests answered before their replies are written
# workers = 0                   # threads for slow operations (key generation, RSA, bulk, disk); 0 = 2 x CPUs, >= 4
# handshake_timeout = 10        # seconds a new connection has to send its HELLO; 0 = forever
# idle_timeout = 0              # seconds a connection may stay silent after HELLO; 0 = forever
# send_timeout = 600            # seconds a reply may wait on a client that does not read (then dropped); 0 = forever
# busy_poll = 0                 # microseconds the loop keeps looking for the next request before it sleeps
#                               #   (up to 10000; 0 = sleep at once): lower latency for a CPU's worth of polling
# audit = "audit.log"           # JSON lines; relative to the state dir, or "/path", "stderr", "off"
# audit_max_bytes = 67108864    # rotate the audit file to <file>.1 at this size; 0 = never
# gc_interval = 5.0             # seconds between garbage-collection sweeps
# ca_bundle = "/etc/ssl/certs/ca-certificates.crt"  # PEM CAs for .builtin_trusted_keys; "" = none
# blacklist_file = ""           # lines of 'tbs:<hex>' / 'bin:<hex>' for .blacklist (docs/trust.md)
# lock_memory = true            # mlockall: keys never reach swap (a warning, not a stop, if the limit is too low)
# harden = true                 # PR_SET_DUMPABLE 0 (no core dumps, no ptrace, no /proc/<pid>/mem) and lock_memory;
#                               #   false only to debug (same as serve --no-harden)
# db_path = "keys.db"                  # persistent keyrings, sealed (docs/persistence.md); relative: under state_dir
# master_key_file = "master.key"       # relative: under state_dir
# passphrase_file = ""                 # derive the master key from a passphrase instead
# master_key_kernel = ""               # e.g. "keyden:master": also hold it in the kernel keyring

[quota]
# maxkeys = 200                 # per non-root uid, as the kernel's key.maxkeys
# maxbytes = 20000
# root_maxkeys = 1000000
# root_maxbytes = 25000000
# gc_delay = 300                # seconds a revoked or expired key lingers
# keyring_max_links = 65536     # links one keyring may hold; over it: ENFILE
# persistent_keyring_expiry = 0     # seconds after the last get_persistent (kernel: 259200); 0 = never
# shm_maxbytes = 1073741824     # shared memory (SHM_ATTACH) mapped for one uid at once; over it: ENOMEM
# shm_total_maxbytes = 4294967296   # ... and for all uids together; 0 turns shared memory off
"""


def default_ca_bundle() -> str:
    """The system's CA bundle (Debian's path) if there is one: .builtin_trusted_keys is loaded from it."""
    path = "/etc/ssl/certs/ca-certificates.crt"
    return path if os.path.exists(path) else ""


def default_state_dir(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("KEYDEN_STATE_DIR"):
        return env["KEYDEN_STATE_DIR"]
    if os.geteuid() == 0:
        return "/var/lib/keyden"
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "keyden")


@dataclass
class ServerConfig:
    socket: str = field(default_factory=default_socket_path)
    state_dir: str = field(default_factory=default_state_dir)
    max_frame: int = DEFAULT_MAX_FRAME
    max_connections: int = 1024
    max_connections_per_uid: int = 256
    receive_maxbytes: int = 256 << 20  # large frames being received for one uid at once (Reactor: they wait)
    receive_total_maxbytes: int = 1 << 30  # ... for all uids together
    max_in_flight: int = 64
    workers: int = 0  # threads for slow operations; 0 = twice the CPUs, at least 4
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0  # long-lived clients (proxies, servers) are normal; the connection caps bound them
    send_timeout: float = 600.0
    busy_poll: int = 0  # µs the request loop polls after a round before it sleeps (docs/operations.md)
    audit: str = "audit.log"
    audit_max_bytes: int = 64 * 1024 * 1024
    gc_interval: float = 5.0
    lock_memory: bool = True
    harden: bool = True
    ca_bundle: str = field(default_factory=default_ca_bundle)
    blacklist_file: str = ""
    db_path: str = ""  # persistent keys; default <state_dir>/keys.db
    master_key_file: str = ""  # default <state_dir>/master.key
    passphrase_file: str = ""  # derive the master key from this passphrase instead (or $KEYDEN_PASSPHRASE_FILE)
    master_key_kernel: str = ""  # also hold the master key in root's kernel user keyring under this description
    adopt_orphans: bool = False  # `serve --adopt-orphans` only, for one start (never from the file): docs/persistence.md
    store: StoreConfig = field(default_factory=StoreConfig)

    def check(self) -> None:
        """Settings that cannot work together: refused at start, not found out by a client that hangs."""
        largest = self.max_frame + HEADER_SIZE
        if min(self.receive_maxbytes, self.receive_total_maxbytes) < largest:
            raise StartupError(f"receive_maxbytes and receive_total_maxbytes must each be at least max_frame + "
                               f"{HEADER_SIZE} ({largest}), or the largest frame could never be received")

    @property
    def config_file(self) -> Path:
        return Path(self.state_dir) / "keyden.toml"

    def prepare_state_dir(self) -> None:
        """First start: make the state directory (0700) and a commented default config; else check it."""
        path = Path(self.state_dir)
        try:
            make_dirs(str(path))
        except FileExistsError:
            pass  # something that is not a directory: check_state_dir says so
        except OSError as exc:
            raise StartupError(f"cannot create the state directory {path}: {exc.strerror}") from None
        check_state_dir(str(path))
        if not self.config_file.exists():  # 0644 whatever the umask: a group-writable one is refused at start
            try:
                fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                if self.config_file.is_symlink() or not self.config_file.is_file():  # a dangling symlink, say
                    raise StartupError(f"cannot create the config file {self.config_file}: it exists and is not "
                                       "a file") from None
                return  # made since we looked (another start at the same time): as if it had been there
            except OSError as exc:
                raise StartupError(f"cannot create the config file {self.config_file}: {exc.strerror}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    os.fchmod(fd, 0o644)
                    f.write(DEFAULT_CONFIG_TEXT)
            except OSError as exc:  # a full disk: no empty config left behind for the next start
                os.unlink(self.config_file)
                raise StartupError(f"cannot write the config file {self.config_file}: {exc.strerror}") from None

    def load_file(self, path: str | os.PathLike | None = None) -> None:
        """Apply a TOML file's settings (unknown keys are errors, so typos do not pass silently)."""
        if not path and os.path.exists(self.state_dir):
            check_state_dir(self.state_dir)  # before trusting the config file inside it
        named, path = bool(path), Path(path) if path else self.config_file
        try:
            path.stat()
        except FileNotFoundError:
            if named:  # a typo in a unit file must not start the daemon on defaults
                raise StartupError(f"the config file {path} does not exist") from None
            return
        except OSError as exc:  # a loop of links, a directory we may not enter...
            raise StartupError(f"cannot read the config file {path}: {exc.strerror}") from None
        check_config_file(path)
        log.info("config: %s", path)
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise E.EINVAL(f"{path}: {exc}") from None
        except OSError as exc:  # a directory, a file we may not read
            raise StartupError(f"cannot read the config file {path}: {exc.strerror}") from None
        quota = data.pop("quota", {})
        if not isinstance(quota, dict):
            raise E.EINVAL(f"{path}: quota must be a table ([quota] with its settings)")
        if "adopt_orphans" in data:  # a recovery an operator asks for once, not a standing policy
            raise E.EINVAL(f"{path}: adopt_orphans is for one start: pass --adopt-orphans to keyden serve")
        _apply(self, data, path, skip={"store"})
        _apply(self.store, quota, path, table="quota")


def check_state_dir(path: str) -> None:
    """Refuse, as sshd's StrictModes does, a state directory that is not the daemon's own.

    Whoever may write in it may replace keyden.toml or swap files around the
    key store.  Group or others may still read and traverse it: the secret
    files in it are each checked for owner and mode.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"the state directory {path} is not a directory; refusing to start")
    require_own(path, st, "state directory", secret=False)
    require_safe_parents(path, "state directory")


def check_config_file(path: Path) -> None:
    """Refuse a config file others could have written: it names the key store, the master key and the
    socket.  Owned by root or the daemon's uid, writable by neither group nor others (readable is fine).
    Only regular files: ``--config /dev/null`` or a pipe is a source the administrator named on the
    command line, not a file anyone could have planted."""
    st = path.stat()
    if stat.S_ISREG(st.st_mode):
        require_own(str(path), st, "config file", secret=False, root_may_own=True)


def _apply(target, values: dict, path, skip=(), table: str = "") -> None:
    known = {f.name: f for f in fields(target) if f.name not in skip}
    for name, value in values.items():
        if name not in known:
            where = f" in [{table}] (the daemon's own settings go above the first [table])" if table else ""
            raise E.EINVAL(f"{path}: unknown setting {name!r}{where}")
        what = f"{path}: [{table}] {name}" if table else f"{path}: {name}"
        value = _in_range(name, _typed(value, type(getattr(target, name)), what), what)
        if isinstance(value, str):
            if "\0" in value:  # no path or name holds one (open() would raise ValueError)
                raise E.EINVAL(f"{what} contains a NUL character")
            if not value and name in _NOT_EMPTY:  # "" is the current directory to the file system
                raise E.EINVAL(f"{what} takes a path, not an empty string")
        setattr(target, name, value)


#: paths an empty string must not stand for (the current directory: a state directory wherever the daemon
#: was started, or a socket bound to no name)
_NOT_EMPTY = frozenset({"socket", "state_dir"})


#: settings with a floor above zero (every number must be finite and at least 0, and at most its ceiling).
#: A frame must carry any one key's description (up to 4 KiB) with its fields: a describe, a KEYS record.
_FLOORS = {"max_frame": 8192, "max_connections": 1, "max_connections_per_uid": 1, "max_in_flight": 1,
           "gc_interval": 0.01}
_CEILING = 2**31 - 1  # what the kernel's sysctls and keyden's 32-bit wire fields can hold
#: settings with a ceiling of their own
_CEILINGS = {"busy_poll": MAX_BUSY_POLL}
#: byte budgets that stay inside the daemon, where gigabytes are normal (shm_total_maxbytes defaults to 4 GiB)
_BYTE_BUDGETS = frozenset({"shm_maxbytes", "shm_total_maxbytes", "receive_maxbytes", "receive_total_maxbytes",
                           "audit_max_bytes"})
_BYTE_CEILING = 2**63 - 1


def _in_range(name: str, value, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    floor = _FLOORS.get(name, 0)
    ceiling = _BYTE_CEILING if name in _BYTE_BUDGETS else _CEILINGS.get(name, _CEILING)
    if not (math.isfinite(value) and floor <= value <= ceiling):
        raise E.EINVAL(f"{what} must be a finite number from {floor} to {ceiling}")
    return value


def _typed(value, kind: type, what: str):
    """``value`` as the setting's type, taken only from its own TOML type (a string "false" is no bool,
    and "abc" no number)."""
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, kind))
    if not ok:
        raise E.EINVAL(f"{what} must be a{'n' if kind.__name__[0] in 'aeiou' else ''} {kind.__name__}, "
                       f"not {type(value).__name__}")
    return kind(value)
