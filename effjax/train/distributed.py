"""Multi-host start-up: ``jax.distributed.initialize`` from flags or environment variables."""

import logging
import os
import sys

import jax

# Environment variables read when the matching flag is not given (a launcher may set either).
ENV = {"coordinator_address": "EFFJAX_COORDINATOR_ADDRESS", "num_processes": "EFFJAX_NUM_PROCESSES",
       "process_id": "EFFJAX_PROCESS_ID"}


def initialize(*, enabled: bool, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               num_cpu_devices: int = 0) -> None:
    """Sets the CPU device count and joins the job when asked; must run before any JAX computation.

    ``enabled`` with no address calls ``jax.distributed.initialize()`` bare, which detects TPU pods,
    SLURM and other clusters itself. An explicit address (flag or ``EFFJAX_COORDINATOR_ADDRESS``)
    also needs the process count and id, as for several processes on one machine.
    """
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    # Cross-process collectives on CPU (local multi-process runs, tests) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"], "")
    if not (enabled or coordinator_address):
        return
    if not coordinator_address:
        jax.distributed.initialize()
    else:
        num_processes = num_processes or int(os.environ.get(ENV["num_processes"], "0"))
        process_id = process_id if process_id >= 0 else int(os.environ.get(ENV["process_id"], "-1"))
        if num_processes <= 0 or process_id < 0:
            raise ValueError(
                f"With a coordinator address ({coordinator_address}) give --num_processes and --process_id "
                f"(or {ENV['num_processes']} and {ENV['process_id']}); got {num_processes} and {process_id}.")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    logging.info("Process %d of %d with %d local devices (%d in all).", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def shutdown() -> None:
    """Leaves a multi-process job and exits at once.

    A CPU client's destructor sometimes hangs for minutes after ``shutdown`` (seen in 3 of 76 two-process
    launches on jax 0.10, never with ``os._exit``), so a multi-process run ends with ``os._exit`` once its
    output is flushed.
    """
    if jax.process_count() == 1:
        return
    jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
