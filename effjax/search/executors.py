"""Where evaluations run: in-process (tests) or in spawned worker processes (§5.6 of ``shared/methods/search.md``).

One small protocol serves the search controller, which is single-threaded and consumes results in its own order:

- ``submit(fn, args) -> handle``: queue ``fn(*args)`` (``fn`` a module-level function, ``args`` picklable);
- ``next_done(timeout) -> (handle, outcome) | None``: the next finished task, ``None`` when ``timeout`` passed
  or nothing is queued;
- ``cancel(handle)`` and ``close()``.

An outcome is ``{"ok": True, "value": ..., "wall": s}`` or ``{"ok": False, "reason": one line, "wall": s}``: an
exception inside ``fn``, a timeout or a dead worker becomes a reason, never an exception in the controller.
``workers`` tells the controller how many tasks to keep in flight by default.

Extension point: a ``RayExecutor`` implements the same four methods with ``ray.remote(num_cpus=1,
max_retries=k)(_call)`` tasks, ``ray.wait(refs, num_returns=1, timeout=...)`` for ``next_done`` and
``ray.cancel(ref, force=True)`` for ``cancel`` and timeouts; nothing else in the search changes.
"""

import collections
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

# Single-threaded XLA/BLAS in each worker: one worker per core beats one multi-threaded process (§5.6).
SINGLE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


class Executor(Protocol):
    workers: int

    def submit(self, fn, args: tuple) -> int: ...

    def next_done(self, timeout: float | None = None) -> tuple[int, dict] | None: ...

    def cancel(self, handle: int) -> None: ...

    def close(self) -> None: ...


def reason_of(e: BaseException) -> str:
    """An exception as one line, ``Type: first line of the message`` (at most 300 characters)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")[:300]


def _call(fn, args: tuple, marker: str | None = None) -> dict:
    """Runs ``fn(*args)`` and returns its outcome; ``marker`` (a file) tells the controller when and where it ran."""
    start = time.time()
    if marker is not None:
        with open(marker + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {start}")
        os.replace(marker + ".tmp", marker)
    try:
        value = fn(*args)
    except Exception as e:
        return {"ok": False, "reason": reason_of(e), "wall": time.time() - start}
    except BaseException as e:  # in-process (no marker) a KeyboardInterrupt is the controller's; in a worker,
        if marker is None:  # a SystemExit is the task's failure
            raise
        return {"ok": False, "reason": reason_of(e), "wall": time.time() - start}
    return {"ok": True, "value": value, "wall": time.time() - start}


class InlineExecutor:
    """Runs tasks in this process, one at a time and in submission order, when ``next_done`` is called.
    ``workers`` only sets how many tasks the controller keeps queued (so a run matches a pool of that size)."""

    def __init__(self, workers: int = 1):
        self.workers = workers
        self._queue: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._next = 0

    def submit(self, fn, args: tuple) -> int:
        handle, self._next = self._next, self._next + 1
        self._queue[handle] = (fn, args)
        return handle

    def next_done(self, timeout: float | None = None) -> tuple[int, dict] | None:
        if not self._queue:
            return None
        handle, (fn, args) = self._queue.popitem(last=False)
        return handle, _call(fn, args)

    def cancel(self, handle: int) -> None:
        self._queue.pop(handle, None)

    def close(self) -> None:
        self._queue.clear()


def _init_worker(env: dict) -> None:
    os.environ.update(env)  # before the task's modules import jax


class _Task:
    def __init__(self, fn, args):
        self.fn, self.args, self.future, self.tries = fn, args, None, 0


class ProcessExecutor:
    """A pool of ``workers`` spawned processes (never fork: a forked JAX process deadlocks).

    ``timeout`` (seconds, per task, from when it starts running) kills an overrunning worker and fails its task;
    a worker that dies (OOM, segfault, ``os._exit``) is replaced and its task failed with the exit code. Other
    tasks caught in the broken pool are resubmitted (a task is pure, so it gives the same result); a task that
    cannot be told apart from the culprit is retried ``retries`` times. ``env`` is applied in each worker before
    any task runs, e.g. ``SINGLE_THREAD_ENV``."""

    def __init__(self, workers: int = 2, *, timeout: float | None = None, env: dict | None = None, retries: int = 1):
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1: pass the number of worker processes")
        self.workers, self.timeout, self.retries = workers, timeout, retries
        self._env = dict(env or {})
        self._dir = tempfile.mkdtemp(prefix="effjax-executor-")
        self._pool: ProcessPoolExecutor | None = None
        self._procs: dict[int, Any] = {}  # pid -> multiprocessing.Process of the current pool
        self._tasks: dict[int, _Task] = {}
        self._doomed: dict[int, str] = {}  # handle -> why we killed its worker
        self._done: collections.deque = collections.deque()
        self._next = 0

    def _marker(self, handle: int) -> str:
        return os.path.join(self._dir, str(handle))

    def _start(self, handle: int) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self._env,))
            self._procs = {}
        task = self._tasks[handle]
        if os.path.exists(self._marker(handle)):
            os.remove(self._marker(handle))
        try:
            task.future = self._pool.submit(_call, task.fn, task.args, self._marker(handle))
        except BrokenProcessPool as e:  # a worker died since the last wait: recovered on the next one
            task.future = Future()
            task.future.set_exception(e)
        self._procs.update(getattr(self._pool, "_processes", None) or {})

    def submit(self, fn, args: tuple) -> int:
        handle, self._next = self._next, self._next + 1
        self._tasks[handle] = _Task(fn, args)
        self._start(handle)
        return handle

    def _started(self, handle: int) -> tuple[int, float] | None:
        try:
            with open(self._marker(handle)) as f:
                pid, start = f.read().split()
            return int(pid), float(start)
        except (OSError, ValueError):
            return None

    def _kill(self, handle: int, reason: str) -> None:
        started = self._started(handle)
        if started is not None and handle not in self._doomed:
            self._doomed[handle] = reason
            try:
                os.kill(started[0], signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_timeouts(self) -> None:
        now = time.time()
        for handle in list(self._tasks):
            started = self._started(handle)
            if started is not None and now - started[1] > self.timeout:
                self._kill(handle, f"timed out after {self.timeout:g} s")

    def _finish(self, handle: int, outcome: dict) -> None:
        self._tasks.pop(handle)
        if os.path.exists(self._marker(handle)):
            os.remove(self._marker(handle))
        self._doomed.pop(handle, None)
        self._done.append((handle, outcome))

    def _recover(self) -> None:
        """The pool broke: fail the culprit(s), resubmit the rest to a fresh pool."""
        wait([t.future for t in self._tasks.values()], timeout=10)
        for p in self._procs.values():
            p.join(timeout=5)
        suspects, culprit = [], False
        for handle, task in list(self._tasks.items()):
            try:
                self._finish(handle, task.future.result(timeout=0))  # finished before the pool broke
                continue
            except (BrokenProcessPool, CancelledError, TimeoutError):
                pass
            started = self._started(handle)
            proc = self._procs.get(started[0]) if started else None
            code = proc.exitcode if proc is not None else None
            wall = time.time() - started[1] if started else 0.0
            if handle in self._doomed:
                self._finish(handle, {"ok": False, "reason": self._doomed[handle], "wall": wall})
                culprit = True
            elif code is not None and code != -signal.SIGTERM:  # died on its own, not terminated by the pool
                self._finish(handle, {"ok": False, "reason": f"worker process died (exit code {code})", "wall": wall})
                culprit = True
            else:
                suspects.append((handle, started is not None and code == -signal.SIGTERM))
        resubmit = []
        for handle, innocent in suspects:  # with no culprit in sight (a worker died before its task started,
            task = self._tasks[handle]  # e.g. arguments that do not unpickle) every other task is charged a try
            if not (culprit or innocent):
                task.tries += 1
            if task.tries > self.retries:
                self._finish(handle, {"ok": False, "wall": 0.0, "reason": f"worker process died {task.tries} times "
                                      "while this task was queued or running (it may not unpickle in a worker)"})
            else:
                resubmit.append(handle)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        for handle in resubmit:
            self._start(handle)

    def next_done(self, timeout: float | None = None) -> tuple[int, dict] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done and self._tasks:
            left = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            futures = {t.future: h for h, t in self._tasks.items()}
            done, _ = wait(futures, timeout=left if self.timeout else (None if deadline is None else left),
                           return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                handle = futures[future]
                try:
                    self._finish(handle, future.result())
                except BrokenProcessPool:
                    broken = True
                except CancelledError:
                    self._tasks.pop(handle, None)
                except Exception as e:  # e.g. a result that does not unpickle
                    self._finish(handle, {"ok": False, "reason": reason_of(e), "wall": 0.0})
            if broken:
                self._recover()
            elif self.timeout:
                self._check_timeouts()
            if deadline is not None and time.monotonic() >= deadline:
                break
        return self._done.popleft() if self._done else None

    def cancel(self, handle: int) -> None:
        task = self._tasks.get(handle)
        if task is None:
            return
        if task.future.cancel():
            self._tasks.pop(handle)
        else:  # running: kill its worker; the pool break is recovered on the next wait
            self._kill(handle, "cancelled")
            self._tasks.pop(handle)

    def close(self) -> None:
        if self._pool is not None:
            running = bool(self._tasks)
            self._pool.shutdown(wait=not running, cancel_futures=True)
            if running:
                for p in self._procs.values():
                    if p.is_alive():
                        p.kill()
            self._pool = None
        self._tasks.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
