"""Trainer overhead: the full training loop vs the bare jitted step on one fixed batch, in one run.

  python benchmarks/trainer_overhead.py --config=configs/lra_listops.py:cpu --steps=300

The full loop (data pipeline, host->device transfer, progress bar, metrics.jsonl/TensorBoard rows,
async checkpoints at the config's cadence) is timed from its own metrics rows, skipping the first
logging window (compilation). The bare step runs the same jitted function on a batch already on
the devices. Prints a table and appends a JSON line to benchmarks/results/trainer_overhead.jsonl.
"""

import datetime
import json
import os
import platform
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/lra_listops.py:cpu"),
                                          "Config to benchmark.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 300, "Timed steps in each measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating repeats of both measurements.")


def bare_step_seconds(config, steps: int) -> float:
    """Seconds per step of the jitted train step alone, on one batch already on the devices."""
    import jax

    from effjax.train import sharding
    from effjax.train.trainer import Run

    run = Run(config)
    state = run.init_state()
    batch = sharding.global_batch(next(run.train_iterator()), run.batch_sharding)
    with run._context():
        for _ in range(3):
            state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = run.train_step(state, batch)
        jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps


def trainer_step_seconds(config, steps: int) -> float:
    """Seconds per step of the full loop, from metrics.jsonl, excluding the compiling first window."""
    from effjax.train import trainer

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.total_steps = steps + config.log_every
        config.eval_every = 0
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    windows = [r for r in rows if "steps_per_sec" in r and r["step"] > config.log_every]
    return sum(config.log_every / r["steps_per_sec"] for r in windows) / (len(windows) * config.log_every)


def main(argv):
    del argv
    import jax

    config = _CONFIG.value
    bare, full = [], []
    for _ in range(_REPEATS.value):
        bare.append(bare_step_seconds(config, _STEPS.value))
        full.append(trainer_step_seconds(config, _STEPS.value))
    bare_s, full_s = min(bare), min(full)
    overhead = full_s / bare_s - 1.0
    device = f"{jax.devices()[0].platform} x{jax.device_count()} ({platform.processor() or platform.machine()}, " \
             f"{os.cpu_count()} cores)"
    print(f"{'measurement':<28}{'s/step':>10}{'steps/s':>10}")
    print(f"{'bare jitted step':<28}{bare_s:>10.4f}{1 / bare_s:>10.2f}")
    print(f"{'full trainer loop':<28}{full_s:>10.4f}{1 / full_s:>10.2f}")
    print(f"trainer overhead: {100 * overhead:+.1f}% of the bare step time "
          f"(log_every={config.log_every}, checkpoint_every={config.checkpoint_every}, batch {config.batch_size}); "
          f"{device}; all repeats bare {[round(b, 4) for b in bare]} full {[round(f, 4) for f in full]}")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "trainer_overhead.jsonl"), "a") as f:
        f.write(json.dumps({"date": datetime.date.today().isoformat(), "device": device,
                            "bare_s_per_step": bare_s, "trainer_s_per_step": full_s, "overhead": overhead,
                            "steps": _STEPS.value, "batch_size": config.batch_size}) + "\n")


if __name__ == "__main__":
    app.run(main)
