"""The workdir before and around a run: checks made before anything is written, and the run's exclusive lock."""

import contextlib
import fcntl
import json
import os
import shutil
import socket

import jax

LOCK_NAME = "effjax.lock"  # holds {"pid", "host"} of the run using the workdir; removed when it ends


class WorkdirError(Exception):
    """A problem with the workdir or its files; the message names it and the fix."""


class WorkdirBusyError(WorkdirError):
    """Another run holds the workdir's lock."""


def say(message: str) -> None:
    """Prints one line on process 0 (the run's notes to the user: resumes, files moved aside)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def free_space(path: str) -> str:
    """'12.3 MiB free' on the file system of ``path`` (for messages about a failed write)."""
    try:
        return f"{shutil.disk_usage(_nearest_existing(os.path.abspath(path))).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(workdir: str) -> None:
    """Raises WorkdirError unless ``workdir`` is (or can be created as) a writable directory."""
    path = os.path.abspath(workdir)
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies under a file ({existing})"
        raise WorkdirError(f"--workdir={workdir} {what}, not a directory; pass a new or existing directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        problem = why if existing == path else f"cannot be created: its parent {existing} {why}"
        raise WorkdirError(f"--workdir={workdir} {problem}; pass a writable --workdir or fix the permissions.")


def free_name(path: str, suffix: str) -> str:
    """``path + suffix``, or ``path + suffix + '-2'``, ``-3``, ... : the first name not taken."""
    candidate, n = path + suffix, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}{suffix}-{n}"
    return candidate


def move_aside(path: str, suffix: str) -> str:
    """Renames ``path`` to a free ``path + suffix[-n]`` and returns the new name (nothing is deleted)."""
    target = free_name(path, suffix)
    os.rename(path, target)
    return target


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            holder = json.load(f)
        return f"pid {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def _acquire(lock_path: str, workdir: str) -> int:
    """An fd holding an exclusive flock on ``lock_path`` (the file now at that path, not an unlinked one)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"--workdir={workdir} is in use by another run ({_holder(lock_path)}, lock file {lock_path}); "
                "wait for it to end or use another --workdir.") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # the previous holder removed it between our open and flock: take the new file
        os.close(fd)


@contextlib.contextmanager
def exclusive(workdir: str):
    """Creates ``workdir`` and holds its lock for the block (process 0 only; the other processes follow it).

    flock dies with the process, so a lock left by a crash (kill -9) is free for the next run.
    """
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    lock_path = os.path.join(workdir, LOCK_NAME)
    fd = _acquire(lock_path, workdir)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)
