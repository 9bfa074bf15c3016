"""Pathfinder / Path-X generator throughput (effjax/data/pathfinder_gen.py), images per second.

  python benchmarks/pathfinder_gen.py --resolution=32 --contour_length=14 --num=2000 --workers=2
  python benchmarks/pathfinder_gen.py --resolution=128 --num=200 --workers=1
  python benchmarks/pathfinder_gen.py --reference=/tmp/old_gen.py   # also time another copy of the module

Times ``pathfinder_gen.generate`` (spawned workers included) after a warm-up of a few examples in this process,
prints images/s and appends a JSON line to benchmarks/results/pathfinder_gen.jsonl. ``--reference`` times a
module file with the same ``generate`` (say, ``git show HEAD~1:effjax/data/pathfinder_gen.py > /tmp/old_gen.py``)
right before, under the same load, and adds its images/s and the speed-up to the row.

Targets are grown for up to TARGET_BATCH examples side by side and a batch lasts as long as its slowest example,
so a small --num under-reports the rate of a full run (at 128 px, 300 images give ~110/s where 2000 give ~145/s).
"""

import datetime
import importlib.util
import json
import os
import platform
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "pathfinder_gen.jsonl")

_RESOLUTION = flags.DEFINE_integer("resolution", 32, "32 (Pathfinder) or 128 (Path-X); 64 and 256 also work.")
_CONTOUR_LENGTH = flags.DEFINE_integer("contour_length", 14, "6, 9 or 14 (hard, LRA's).")
_NUM = flags.DEFINE_integer("num", 1000, "Images to generate.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Spawned worker processes (1: in this process).")
_SEED = flags.DEFINE_integer("seed", 0, "Stream seed.")
_REFERENCE = flags.DEFINE_string("reference", "", "A copy of pathfinder_gen.py to time first, for a ratio.")


def _load(path: str):
    """The module at ``path``, importable by name in spawned workers (its folder goes on sys.path)."""
    name = os.path.splitext(os.path.basename(path))[0]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def images_per_second(module) -> float:
    kwargs = dict(resolution=_RESOLUTION.value, contour_length=_CONTOUR_LENGTH.value, seed=_SEED.value)
    module.generate(2, **kwargs)  # geometry tables and imports, outside the timing
    start = time.perf_counter()
    module.generate(_NUM.value, workers=_WORKERS.value, **kwargs)
    return _NUM.value / (time.perf_counter() - start)


def main(argv):
    del argv
    from effjax.data import pathfinder_gen

    row = {"date": datetime.date.today().isoformat(),
           "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "resolution": _RESOLUTION.value, "contour_length": _CONTOUR_LENGTH.value, "num": _NUM.value,
           "workers": _WORKERS.value}
    if _REFERENCE.value:
        row["reference"] = _REFERENCE.value
        row["reference_images_per_s"] = round(images_per_second(_load(_REFERENCE.value)), 1)
    row["images_per_s"] = round(images_per_second(pathfinder_gen), 1)
    if _REFERENCE.value:
        row["speedup"] = round(row["images_per_s"] / row["reference_images_per_s"], 2)
    print(f"pathfinder_gen {row['resolution']}x{row['resolution']} contour_length {row['contour_length']}, "
          f"{row['workers']} worker(s): {row['images_per_s']} images/s"
          + (f" (reference {row['reference_images_per_s']}, x{row['speedup']})" if _REFERENCE.value else ""))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
