"""Safe file output: writes that are atomic and name their owner, stale-temp clean-up, early checks.

Every file this codebase writes goes through `atomic_write`: the bytes go to a temporary
sibling `.tmp-<host>-<pid>-<name>`, are fsynced, and replace `<name>` in one rename, so a kill
or a full disk leaves the previous file intact and at worst a temporary that `remove_stale_temps`
recognises at the next start-up (its owner is in its name). `check_writable` proves an output
folder is writable before any work, so a read-only or misnamed path costs seconds, not a run.
"""
import errno
import os
import re
import shutil
import socket
import time

from errors import UserError

TEMP_PREFIX = ".tmp-"
# Temporaries of another host cannot be checked for a live owner: removed only when this old.
FOREIGN_TEMP_AGE_S = 24 * 3600
# Names written before owners were recorded (mkstemp `.tmp-XXXXXXXX.pt`, generate's `.tmp-<pid>-<name>`,
# `<name>.npz.tmp-<pid>`): a live writer keeps touching its file, so one untouched this long is dead.
LEGACY_TEMP_AGE_S = 3600
_LEGACY_MKSTEMP = re.compile(r"\.tmp-[a-z0-9_]{8}\.pt")  # tempfile.mkstemp(prefix=".tmp-", suffix=".pt")
_LEGACY_PID_FIRST = re.compile(r"\.tmp-(\d+)-.+")          # generate.py PNGs: .tmp-<pid>-<name>
_LEGACY_PID_LAST = re.compile(r".+\.npz\.tmp-(\d+)")       # generate.py npz: <folder>.npz.tmp-<pid>
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(UserError, RuntimeError):
    """An output the user must fix (folder not writable, disk full); the message is one line."""


class OutputNotWritable(OutputError):
    """An output folder cannot be created or written; the message names it, the flag and the cause."""


class DiskFull(OutputError):
    """No space (or quota) left while writing; the message names the file, the free and the needed space."""


def _host():
    # '-' separates the fields of a temporary's name, so a host name's dashes become '_'.
    return socket.gethostname().replace("-", "_") or "localhost"


def temp_path(path):
    """The temporary sibling of `path` that this process writes before renaming: `.tmp-<host>-<pid>-<name>`."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f"{TEMP_PREFIX}{_host()}-{os.getpid()}-{name}")


def human_bytes(n):
    """1536 -> '1.5 KiB' (binary units, as df -h)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pid_alive(pid):
    """Whether a process with this id runs on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(name):
    """(host, pid) that a temporary's file name records, or None if `name` is not a temporary.

    host is None for legacy names (no host recorded); pid is None for mkstemp checkpoint names.
    """
    if _LEGACY_MKSTEMP.fullmatch(name):
        return None, None
    m = _LEGACY_PID_LAST.fullmatch(name)
    if m:
        return None, int(m.group(1))
    if not name.startswith(TEMP_PREFIX):
        return None
    host, pid, rest = (name[len(TEMP_PREFIX):].split("-", 2) + ["", ""])[:3]
    # An all-digit first field is a legacy pid (`.tmp-<pid>-<name>`) unless it is this host's name.
    if pid.isdigit() and rest and (host == _host() or not host.isdigit()):
        return host, int(pid)
    m = _LEGACY_PID_FIRST.fullmatch(name)
    if m:
        return None, int(m.group(1))
    return None


def _stale_reason(name, age_s):
    """Why the temporary `name` (untouched for age_s seconds) is abandoned, or None to keep it."""
    owner = temp_owner(name)
    if owner is None:
        return None
    host, pid = owner
    if host == _host():
        return None if pid_alive(pid) else f"its process {pid} has exited"
    if host is not None:
        return f"written on host {host}, untouched for {age_s / 3600:.0f} h" if age_s > FOREIGN_TEMP_AGE_S else None
    if age_s <= LEGACY_TEMP_AGE_S or (pid is not None and pid_alive(pid)):
        return None
    return f"old-style name, untouched for {age_s / 3600:.1f} h"


def remove_stale_temps(directory, log=print):
    """Remove the temporaries in `directory` (not its subfolders) that no live process owns.

    Ours (`.tmp-<host>-<pid>-<name>`): removed when <host> is this machine and <pid> has exited;
    another host's only after FOREIGN_TEMP_AGE_S untouched (its owner cannot be checked from here).
    Legacy names without a host: after LEGACY_TEMP_AGE_S untouched, and where they carry a pid,
    only if no process with that pid runs here. Each removal is reported through `log` with the
    file's size. Returns the removed paths. A missing folder has nothing to clean.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in sorted(entries, key=lambda e: e.name):
        if ".tmp-" not in entry.name or not entry.is_file(follow_symlinks=False):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        reason = _stale_reason(entry.name, now - st.st_mtime)
        if reason is None:
            continue
        try:
            os.remove(entry.path)
        except FileNotFoundError:  # another process cleaned it first
            continue
        log(f"removed stale temporary file {entry.path} ({human_bytes(st.st_size)}; {reason})")
        removed.append(entry.path)
    return removed


def _cause(exc):
    return (exc.strerror or str(exc)).lower() if isinstance(exc, OSError) else str(exc)


def check_writable(directory, flag):
    """Create `directory` if needed and prove a file can be written in it; else OutputNotWritable.

    Call before any work. `flag` is the option that chooses this folder (e.g. '--results-dir'),
    named in the message as the fix.
    """
    directory = os.fspath(directory) or "."
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputNotWritable(f"cannot write to {directory} (it is a file, not a folder); "
                                f"choose a writable place with {flag}")
    probe = temp_path(os.path.join(directory, "write-probe"))
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")  # one byte: a full disk fails here, not only at the first real write
        os.remove(probe)
    except OSError as exc:
        try:
            os.remove(probe)
        except OSError:
            pass
        raise OutputNotWritable(f"cannot write to {directory} ({_cause(exc)}); choose a writable place with {flag}"
                                ) from None


def payload_bytes(obj):
    """Sum of `.nbytes` of the tensors / arrays nested in dicts, lists and tuples: a file-size estimate."""
    if hasattr(obj, "nbytes") and not isinstance(obj, (bytes, bytearray)):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


class _RecordingFile:
    """A file wrapper that remembers the OSError of a failed write (torch.save re-raises it as a
    RuntimeError without the errno) and counts the bytes written."""

    def __init__(self, f):
        self._f, self.error, self.written = f, None, 0

    def write(self, data):
        try:
            n = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.written += n if n is not None else len(data)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on some file systems / platforms: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn, expected_bytes=None, fsync=True):
    """Write `path` by calling write_fn(binary file) on its temp_path, fsync, then rename over `path`.

    On any failure the temporary is removed and a previous `path` stays untouched. No space or
    quota left becomes DiskFull naming the path, the free space and the space needed
    (`expected_bytes` if given, else at least what was written before the failure). The file gets
    the permissions open() would give (0666 minus the umask), also for readers on a shared cluster.
    `fsync=False` skips both fsyncs (many small files, e.g. sample PNGs: a killed process still
    leaves old-or-new, only a power cut can leave an empty file).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    recorder = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            write_fn(recorder)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            free = shutil.disk_usage(directory).free
            needed = (human_bytes(expected_bytes) if expected_bytes
                      else f"more than {human_bytes(recorder.written if recorder else 0)}")
            what = "previous file kept" if os.path.exists(path) else "nothing written"
            raise DiskFull(f"{_cause(cause)} while writing {path}: {human_bytes(free)} free there, {needed} needed; "
                           f"free some space or write elsewhere ({what})") from None
        raise
    if fsync:
        _fsync_directory(directory)
