"""The daemon's own files and directories: made private whatever the umask, refused when another user
could have read or swapped them (as sshd's StrictModes), and secrets written whole or not at all."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from keyden.errors import StartupError


def require_own(path: str, st: os.stat_result, what: str, *, secret: bool = True,
                root_may_own: bool = False) -> None:
    """Refuse to start, as sshd's StrictModes does, on a file or directory that is not the daemon's own.

    ``secret``: group and others may have no access at all (else they may read, not write); with
    ``root_may_own`` root's files pass too (a config under /etc).  Nothing is tightened behind the
    administrator's back: a wrong owner or mode means someone else may already have read or replaced
    the file, which only a human can judge.
    """
    uid = os.geteuid()
    if st.st_uid != uid and not (root_may_own and st.st_uid == 0):
        owners = f"neither root nor the daemon's uid {uid}" if root_may_own else f"not the daemon's uid {uid}"
        raise StartupError(f"the {what} {path} is owned by uid {st.st_uid}, {owners}; "
                           f"refusing to start (check nobody else had it, then: chown {uid} {path})")
    mode = stat.S_IMODE(st.st_mode)
    mask, open_to, fix = (0o077, "open to", "chmod 600") if secret else (0o022, "writable by", "chmod go-w")
    if mode & mask:
        raise StartupError(f"the {what} {path} has mode {mode:04o}, {open_to} group or others; refusing to "
                           f"start (check nobody else used it, then: {fix} {path})")


def make_dirs(path: str, mode: int = 0o700) -> None:
    """``path`` and its missing parents, each made with a fixed mode whatever the umask: ``path`` itself
    ``mode``, parents 0755.  (os.makedirs leaves parents 0777 less the umask: under umask 000 anyone could
    rename one and put a directory of their own where the daemon's files go.)  OSError as os.mkdir's."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for index, directory in enumerate(reversed(missing)):
        wanted = mode if index == len(missing) - 1 else 0o755
        os.mkdir(directory, wanted)
        # The mode set on what was made, not on what the name leads to now: a directory renamed away and a
        # symbolic link put in its place (ENOTDIR here) must not pass the mode on to the link's target.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, wanted)
        finally:
            os.close(fd)


def require_safe_parents(path: str, what: str) -> None:
    """Refuse, as sshd's StrictModes does for a home directory, a ``path`` another user could swap out:
    each directory in which a name on the way to it is looked up must be owned by root or the daemon's
    uid and writable by neither group nor others, unless sticky (as /tmp, where only an entry's owner may
    rename it, so a symbolic link there must be root's or the daemon's); links are followed (a link in a
    safe directory that leads into an unsafe one, or that its owner may replace, was passed over when
    only the resolved path's directories were checked: an empty directory swapped in made a new, empty
    store)."""
    uid = os.geteuid()
    sticky = False  # the directory the last name was looked up in
    for directory, link in _lookups(path, what):
        try:
            st = os.lstat(link) if link else os.stat(directory)
        except OSError as exc:
            raise StartupError(f"cannot examine {link or directory}, on the way to the {what} {path}: "
                               f"{exc.strerror}") from None
        if link:
            if sticky and st.st_uid not in (0, uid):
                raise StartupError(f"the {what} {path} is reached through {link}, a symbolic link owned by uid "
                                   f"{st.st_uid} in a sticky directory, who could replace it; refusing to start")
            continue
        sticky = bool(st.st_mode & stat.S_ISVTX)
        loose = stat.S_IMODE(st.st_mode) & 0o022 and not sticky
        if st.st_uid not in (0, uid) or loose:
            owner = f"owned by uid {st.st_uid}" if st.st_uid not in (0, uid) else \
                f"mode {stat.S_IMODE(st.st_mode):04o}, writable by group or others"
            raise StartupError(f"the {what} {path} is under {directory}, {owner}: whoever may rename entries "
                               f"there could put a {what} of their own in its place; refusing to start")


def _lookups(path: str, what: str):
    """What resolving ``path`` looks at, as the kernel walks it: (directory, "") for each directory a name
    is looked up in, and (directory, link) for each symbolic link met, whose target is walked in turn.
    The walk ends at the first name that does not exist yet (make_dirs makes the rest, privately)."""
    try:
        full = path if path.startswith("/") else os.path.join(os.getcwd(), path)  # (the way to the cwd too)
    except OSError as exc:
        raise StartupError(f"cannot find the current directory, for the {what} {path}: {exc.strerror}") from None
    pending = [part for part in full.split("/") if part][::-1]  # the next name last
    current = "/"
    links = 0
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        yield current, ""
        entry = os.path.join(current, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"cannot examine {entry}, on the way to the {what} {path}: {exc.strerror}") from None
        if not stat.S_ISLNK(st.st_mode):
            current = entry
            continue
        links += 1
        if links > 40:  # the kernel's own bound (ELOOP)
            raise StartupError(f"the {what} {path}: too many symbolic links on the way")
        yield current, entry
        try:
            target = os.readlink(entry)
        except OSError as exc:
            raise StartupError(f"cannot read {entry}, on the way to the {what} {path}: {exc.strerror}") from None
        if target.startswith("/"):
            current = "/"
        pending += [part for part in target.split("/") if part][::-1]


def require_safe_directory(path: str, what: str) -> None:
    """Refuse a configured ``path`` (``db_path``, ``master_key_file``) whose directory is not as safe as the
    state directory: whoever may write in it could rename an older copy over the file (the whole store
    rolled back), delete it (a new, empty store) or plant a -wal beside it.  The directory is held to the
    state directory's rule, though root may own it, and a sticky bit does not excuse it (anyone may still
    create the -wal the daemon would open); the ones above it to ``require_safe_parents``.  A directory
    still to be made is made private by ``make_dirs``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise StartupError(f"cannot examine the directory of the {what} {path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise StartupError(f"the {what} {path} is under {directory}, which is not a directory")
        require_own(directory, st, f"directory of the {what}", secret=False, root_may_own=True)
    require_safe_parents(path, what)


def write_secret_file(path: str, data: bytes, replace: bool = False) -> None:
    """Create ``path`` with mode 0600 and ``data``, durably (file and directory entry synced), whole or
    not at all: written beside it and then linked (or, with ``replace``, renamed) into place, so a full
    disk leaves no empty key file that every later start would refuse.  The file beside it has a name of
    its own (mkstemp: O_EXCL, 0600): one named by the pid met the leftover of a crashed process with the
    same pid (PID 1 in a container) and failed with EEXIST."""
    directory = os.path.dirname(path) or "."
    make_dirs(directory)
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".partial-", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # EEXIST, as O_EXCL: an existing key file is never overwritten
    finally:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    """Make a new, renamed or removed entry in the directory of ``path`` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
