"""Trains every (attention method, LRA task) cell and writes the Long Range Arena table (Tay et al. 2021, Table 1).

  python -m effjax.lra --methods=softmax,performer --tasks=listops --protocol=modern --size=cpu \
      --workdir=/tmp/lra
  python -m effjax.lra --methods=paper --tasks=all --workdir=/tmp/lra --devices=0,1,2,3   # 4 cells at a time
  python -m effjax.lra --workdir=/tmp/lra --report_only                                     # table from disk

Each cell is ``python -m effjax.main --config=configs/lra_<task>.py:protocol=..,size=..,stage=finetune
--workdir=<workdir>/<task>/<method> --config.model.attention=<method> <overrides>``, logged to
``<cell>/run.log``; its final test row is recorded in ``<cell>/result.json``. Writes ``<workdir>/lra_results.md``
(Table 1 layout with the paper's rows, the 5-task and 6-task averages and ListOps' majority-class rate),
``lra_results.json`` and ``lra_results.png`` after every cell.

- The same command resumes: finished cells are skipped, unfinished ones resume from their checkpoints.
- A task whose data is not prepared is shown as ``no data`` with the trainer's how-to line; any other failure as
  ``failed`` with its last stderr line and log. The run goes on; the exit code is 1 if a cell failed.
- ``--pretrain``: self-pretraining (Amos et al., "Never Train from Scratch") in ``<cell>/pretrain`` first.
- ``--overrides=--config.total_steps=100`` (repeatable, or several in one quoted string) reaches every cell.
- ``--data_dir=text=DIR,image=DIR,retrieval=DIR``: where the prepared data lies (TFDS data_dir; the AAN TSV files).
- ``--devices=0,1,2,3 --gpus_per_cell=2``: two cells at a time, each on two GPUs (``CUDA_VISIBLE_DEVICES``), or TPU
  chips with ``--device_platform=tpu``. ``--ray_address=host:port`` (or ``local``) runs cells as Ray tasks; the
  repository and ``--workdir`` must then be at the same paths on every node (a shared file system).
"""

import sys

from absl import app, flags

from effjax.lra import cells, runner

_METHODS = flags.DEFINE_list("methods", None, "Attention methods (effjax.attention.names()), 'paper' (the 8 with "
                             "a row in LRA Table 1) or 'all'.")
_TASKS = flags.DEFINE_list("tasks", None, f"LRA tasks ({', '.join(cells.TASKS)}) or 'all'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the cells (<workdir>/<task>/<method>/) and the table.")
_PROTOCOL = flags.DEFINE_enum("protocol", "lra_original", list(cells.PROTOCOLS), "Task config protocol.")
_SIZE = flags.DEFINE_enum("size", "full", list(cells.SIZES), "Task config size (cpu: minutes; smoke: tests).")
_PRETRAIN = flags.DEFINE_bool("pretrain", False, "Self-pretrain each cell on its task's inputs, then fine-tune.")
_PARALLEL = flags.DEFINE_integer("parallel", 0, "Cells at a time on this machine (0: 1, or one per device group).")
_DEVICES = flags.DEFINE_list("devices", [], "Accelerator ids to share between cells, e.g. 0,1,2,3.")
_GPUS_PER_CELL = flags.DEFINE_integer("gpus_per_cell", 0, "Devices per cell: with --devices (0 means 1), or GPUs "
                                      "per Ray task with --ray_address (0: none).")
_PLATFORM = flags.DEFINE_enum("device_platform", "gpu", ["gpu", "tpu"], "How --devices are assigned: "
                              "CUDA_VISIBLE_DEVICES (gpu) or the TPU chip variables (tpu).")
_RAY = flags.DEFINE_string("ray_address", "", "Run cells as Ray tasks: 'local' or a cluster's host:port.")
_DATA_DIR = flags.DEFINE_list("data_dir", [], "Where prepared data lies, per task: text=DIR,image=DIR (TFDS "
                              "data_dir) and retrieval=DIR (the AAN TSV files).")
_OVERRIDES = flags.DEFINE_multi_string("overrides", [], "--config.key=value overrides passed to every cell.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the table from the cells under --workdir "
                                  "(with the settings they ran with); run nothing.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"effjax.lra: unexpected arguments {' '.join(argv[1:])}; pass options as --name=value.")
    if not _REPORT_ONLY.value and not (_METHODS.value and _TASKS.value):
        sys.exit("effjax.lra: pass --methods and --tasks (or --report_only to rebuild the table from --workdir).")
    settings = runner.Settings(
        workdir=_WORKDIR.value, tasks=_TASKS.value, methods=_METHODS.value, protocol=_PROTOCOL.value,
        size=_SIZE.value, pretrain=_PRETRAIN.value, overrides=tuple(_OVERRIDES.value),
        data_dirs=tuple(_DATA_DIR.value), parallel=_PARALLEL.value,
        devices=tuple(_DEVICES.value), gpus_per_cell=_GPUS_PER_CELL.value, device_platform=_PLATFORM.value,
        ray_address=_RAY.value, report_only=_REPORT_ONLY.value)
    try:
        code = runner.run(settings, say=lambda line: print(line, flush=True))
    except ValueError as error:
        sys.exit(f"effjax.lra: {error}")
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
