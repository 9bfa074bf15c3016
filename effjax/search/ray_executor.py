"""Evaluations as Ray tasks, for searches past one machine (``search.md`` §5.6; ``pip install ray``).

The same protocol as ``effjax.search.executors`` (``submit``, ``next_done``, ``cancel``, ``close``): each band
is a ``ray.remote(num_cpus=..., num_gpus=...)`` task running the same ``_call`` wrapper, so a failure inside a
task becomes its one-line reason, a worker that dies becomes a failed task (after ``retries`` re-runs, which Ray
does itself), and a task that overruns ``timeout`` is cancelled and failed. The controller consumes results in
submission order, so a seeded, step-budgeted search writes the same journal here as with local processes.

``address``: 'local' starts a Ray instance on this machine with ``workers`` CPUs (stopped by ``close``); a
'host:port' or 'ray://host:port' address joins a running cluster, checked first so that an address nobody
answers fails at once, in one line. ``jax.distributed`` is not involved: each task is one independent process.
"""

import socket
import time

from effjax.search.executors import _call, reason_of


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=seconds):
            return
    except (OSError, ValueError) as err:
        raise ValueError(f"config.ray_address={address!r} does not answer ({type(err).__name__}: {err}); start "
                         "the cluster (ray start --head) or use 'local' for a Ray instance on this machine, or '' "
                         "for plain local processes.") from None


class RayExecutor:
    def __init__(self, address: str = "local", workers: int = 2, *, timeout: float | None = None,
                 env: dict | None = None, retries: int = 1, num_cpus: float = 1, num_gpus: float = 0):
        try:
            import ray
        except ImportError:
            raise ValueError("config.ray_address is set but Ray is not installed; pip install 'effjax[ray]' (or "
                             "ray), or unset config.ray_address to search with local processes.") from None
        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            runtime_env = {"env_vars": dict(env)} if env else None
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                         configure_logging=False)
            else:
                _check_reachable(address)
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, configure_logging=False)
            self._owned = True
        self.workers = workers
        self.timeout = timeout
        self._remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries)(_call)
        self._refs: dict[int, tuple] = {}  # handle -> (ref, submitted at)
        self._next = 0

    def submit(self, fn, args: tuple) -> int:
        handle, self._next = self._next, self._next + 1
        self._refs[handle] = (self._remote.remote(fn, args), time.time())
        return handle

    def _overdue(self) -> tuple[int, dict] | None:
        if self.timeout is None:
            return None
        now = time.time()
        for handle, (ref, start) in self._refs.items():
            if now - start > self.timeout:
                self._ray.cancel(ref, force=True)
                del self._refs[handle]
                return handle, {"ok": False, "reason": f"timed out after {self.timeout:g} s", "wall": now - start}
        return None

    def next_done(self, timeout: float | None = None) -> tuple[int, dict] | None:
        if not self._refs:
            return None
        overdue = self._overdue()
        if overdue is not None:
            return overdue
        by_ref = {ref: handle for handle, (ref, _) in self._refs.items()}
        ready, _ = self._ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if not ready:
            return self._overdue()
        handle = by_ref[ready[0]]
        _, start = self._refs.pop(handle)
        try:
            return handle, self._ray.get(ready[0])
        except Exception as err:  # the worker died (after Ray's retries) or the task was cancelled
            return handle, {"ok": False, "reason": reason_of(err), "wall": time.time() - start}

    def cancel(self, handle: int) -> None:
        entry = self._refs.pop(handle, None)
        if entry is not None:
            self._ray.cancel(entry[0], force=True)

    def close(self) -> None:
        for handle in list(self._refs):
            self.cancel(handle)
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False
