"""Command-line entry point: parses flags, joins a multi-host job if asked, and trains.

  python -m effjax.main --config=configs/lra_listops.py:cpu --workdir=/tmp/listops \
      --config.total_steps=200 --config.model.num_layers=2
"""

import logging as std_logging
import os
import re
import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detects "
                                 "TPU pods and SLURM); implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-host job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Emulated CPU devices per process (0: JAX default).")
flags.mark_flags_as_required(["config", "workdir"])


def _config_key_error(error: Exception, argv) -> str:
    """A one-line message for a misspelled --config.* override, naming the closest valid keys."""
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
    match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    suggestion, bad = match.groups() if match else (None, text)
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and bad in a), "--config.*")
    hint = f'Did you mean "{suggestion}"?' if suggestion else "No similar key; see the config file for valid keys."
    return f"Unknown config key {bad!r} in {flag}. {hint}"


def parse_flags(argv):
    """Parses flags; a misspelled config override exits at once with the closest valid names."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"FATAL flags error: {error}\nPass --help for usage.")
    except (AttributeError, KeyError) as error:
        sys.exit(_config_key_error(error, argv))


def _stop_during_start_up(signum, frame):
    """SIGTERM/SIGINT before the trainer installs its own handlers: one line, exit 128 + signal."""
    name = signal.Signals(signum).name
    sys.stderr.write(f"effjax: stopped by {name} during start-up, before training; nothing was written.\n")
    sys.exit(128 + signum)


def _load_config():
    """The parsed --config, or a one-line exit when its file does not exist (ml_collections fails lazily)."""
    path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]  # without its :arg
    if not os.path.isfile(path):
        sys.exit(f"effjax: config file {path!r} (from --config) does not exist; check the path.")
    return _CONFIG.value


class _DropFailedSaveLogs(std_logging.Filter):
    """Hides the multi-line error logs of a failed async save, which the trainer reports in one line (-v shows them).

    They are orbax's own, and asyncio's 'exception was never retrieved' for the tasks of the save that orbax
    abandoned when it failed (only orbax runs asyncio in this process).
    """

    def filter(self, record):
        if record.levelno < std_logging.ERROR:
            return True
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        abandoned = record.name == "asyncio" and "exception was never retrieved" in record.getMessage()
        return not (from_orbax or abandoned)


def _drop_abandoned_write_callbacks(unraisable):
    """Hides 'Event loop is closed' from tensorstore's callbacks of writes that a failed save abandoned.

    When one write of an async save fails (e.g. the disk is full), orbax closes the save's event loop while
    tensorstore still has writes of that save in flight; each that completes then tries to wake the closed
    loop and tensorstore prints the RuntimeError as unraisable, from its own threads, before or after the
    trainer's one line. They only wrote into the failed save's temporary directory (removed at the next
    start). Any other unraisable exception is printed as usual, and -v shows these too.
    """
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and any(
            frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))):
        sys.__unraisablehook__(unraisable)


def main(argv):
    del argv
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_during_start_up)
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:  # orbax and grain log every save at INFO
        logging.set_verbosity(logging.WARNING)
        for name in ("absl", "asyncio"):  # a logger's filters see only the records logged to it
            std_logging.getLogger(name).addFilter(_DropFailedSaveLogs())
        sys.unraisablehook = _drop_abandoned_write_callbacks
    config = _load_config()
    from effjax.train import distributed

    distributed.initialize(enabled=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           num_cpu_devices=_CPU_DEVICES.value)
    from effjax.train import trainer, workdir

    try:
        result = trainer.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, OSError, FloatingPointError, workdir.WorkdirError) as error:
        if verbose:  # -v N: show where it came from
            raise
        sys.exit(f"effjax: {type(error).__name__}: {error}")
    print(trainer.summary_line(result), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
