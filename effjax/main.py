"""Command-line entry point: parses flags, joins a multi-host job if asked, and trains.

  python -m effjax.main --config=configs/lra_listops.py:cpu --workdir=/tmp/listops \
      --config.total_steps=200 --config.model.num_layers=2
"""

import logging as std_logging
import os
import re
import signal
import sys

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


class _DropOrbaxErrors(std_logging.Filter):
    """Hides orbax's multi-line error logs of a failed save: the trainer reports it in one line (-v shows them)."""

    def filter(self, record):
        return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def main(argv):
    del argv
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_during_start_up)
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:  # orbax and grain log every save at INFO
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("absl").addFilter(_DropOrbaxErrors())
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
