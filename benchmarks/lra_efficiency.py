"""Long Range Arena Table 2 (Tay et al. 2021): training steps/s and peak memory of the Text model per method.

  python benchmarks/lra_efficiency.py                       # the default methods at 1K, 2K, 3K, 4K, batch 32
  python benchmarks/lra_efficiency.py --methods=softmax,performer --lengths=1024,2048 --batch=4

The model is ``configs/lra_text.py``'s (4 layers, embed 256, 4 heads, mlp 1024, CLS pooling, its dropout and
optimizer) with ``model.attention`` set per method. Each step is the trainer's own jitted train step
(``effjax.train.trainer.Run.train_step``: forward + backward + optimizer update) on random byte tokens
(IMDb is not needed). The length counts the CLS token, so block methods see whole blocks: at 1K the model
reads 1,023 bytes. steps/s is ``--steps`` steps over the best of ``--repeats`` timed runs after a warm-up step.

Memory: on CPU, the peak XLA plans for one step (``compiled.memory_analysis()``: arguments + outputs +
temporaries); on GPU/TPU, ``device.memory_stats()['peak_bytes_in_use']`` after the steps, each configuration in
its own process so that the peak is that configuration's (``--isolate``). The table says which. A configuration
whose planned memory exceeds ``--max_memory_gb`` is not run ("skipped: planned N GB").

``--impls``: the ``model.attention_impl`` values; 'pallas' runs only methods with a kernel path (CAPABILITIES)
and is left out on CPU by default, where Pallas runs interpreted. Ratios are to softmax with the same impl
at the same length, measured in the same run.

Writes ``benchmarks/results/lra_efficiency.{jsonl,md,png}`` (``--out``).
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import efficiency_common as shared  # noqa: E402
from benchmarks.lra_efficiency_tables import GB, plan, tables  # noqa: E402

DEFAULT_METHODS = ["softmax", "block_local", "linformer", "reformer", "bigbird", "linear_elu", "performer",
                   "longformer", "nystromformer", "cosformer"]

_METHODS = flags.DEFINE_list("methods", DEFAULT_METHODS, "Attention methods (softmax is always added).")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "3072", "4096"], "Sequence lengths, CLS included.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size (LRA Table 2: 32).")
_IMPLS = flags.DEFINE_list("impls", [], "model.attention_impl values (default: xla, plus pallas off CPU).")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration (the best is kept).")
_MAX_MEMORY_GB = flags.DEFINE_float("max_memory_gb", 16.0, "Skip configurations planned above this (GB = 2^30 B).")
_CONFIG = flags.DEFINE_string("config", "configs/lra_text.py", "The task config whose model is timed (file.py[:arg]).")
_ISOLATE = flags.DEFINE_enum("isolate", "auto", ["auto", "yes", "no"],
                             "One process per configuration (auto: off CPU, so peak_bytes_in_use is its own).")
_ONE = flags.DEFINE_string("one", "", "Internal: measure only 'method,impl,length' and print its row as JSON.")
_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "lra_efficiency"),
                           "Path and basename of the .jsonl, .md and .png written.")
ROW_PREFIX = "LRA_EFFICIENCY_ROW "


def load_config(path: str):
    """``get_config(arg)`` of the config file at ``path`` (relative to the repository root; ``file.py:arg``)."""
    import importlib.util

    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("benchmarked_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def random_bytes_source(length: int, num_classes: int):
    """A classification source of random byte tokens (ids 1..256, no padding) of ``length`` tokens."""
    import numpy as np

    from effjax.data import common

    class RandomBytes(common.Source):
        vocab_size = common.BYTE_VOCAB_SIZE
        max_length = length

        def __init__(self):
            super().__init__("train", {"length": length})
            self.num_classes = num_classes

        def __len__(self):
            return 1024

        def __getitem__(self, index):
            rng = np.random.default_rng(index)
            inputs = rng.integers(1, common.BYTE_VOCAB_SIZE, length).astype(np.int32)
            return common.classification_example(inputs, int(rng.integers(num_classes)))

    return RandomBytes()


def text_config(method: str, impl: str, length: int, batch: int, config_path: str):
    """The task config with ``method`` on every layer, ``impl``, and ``length`` positions (CLS included)."""
    config = load_config(config_path)
    prefix = int(config.model.get("pooling", "cls") == "cls")
    with config.unlocked():
        config.batch_size = config.eval_batch_size = batch
        config.model.attention = method
        config.model.attention_impl = impl
        config.model.max_length = config.data.max_length = length - prefix
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return config


def measure(method: str, impl: str, length: int, *, batch=32, steps=5, repeats=3, max_bytes=16 * GB,
            config_path="configs/lra_text.py") -> dict:
    """One row: status ('ok', 'refused: why', 'skipped: planned N GB', 'failed: why'), memory and steps/s."""
    import jax
    import numpy as np

    from effjax.train import sharding
    from effjax.train.trainer import Run

    row = {"method": method, "impl": impl, "length": length}
    config = text_config(method, impl, length, batch, config_path)
    try:
        source = random_bytes_source(config.data.max_length, 2)
        run = Run(config, devices=jax.devices()[:1], sources=(source, source))
        items = [source[i] for i in range(batch)]
        local = {key: np.stack([item[key] for item in items]) for key in items[0]}
        batch_arrays = sharding.global_batch(local, run.batch_sharding)
        with run._context():
            compiled = run.train_step.lower(run.abstract_state, batch_arrays).compile()
    except (NotImplementedError, ValueError) as error:
        return {**row, "status": f"refused: {str(error).splitlines()[0][:160]}"}
    planned = shared.planned_bytes(compiled)
    row.update(planned_bytes=planned, memory_bytes=planned, memory_source="memory_analysis")
    if planned > max_bytes:
        return {**row, "status": f"skipped: planned {planned / GB:.1f} GB"}
    try:
        state = run.init_state()
        state, metrics = compiled(state, batch_arrays)  # warm-up
        jax.block_until_ready(metrics)

        def timed_steps():
            nonlocal state, metrics
            for _ in range(steps):
                state, metrics = compiled(state, batch_arrays)
            jax.block_until_ready((state, metrics))

        seconds = shared.best_seconds(timed_steps, repeats)
    except Exception as error:  # an accelerator running out of memory raises XlaRuntimeError
        return {**row, "status": f"failed: {str(error).splitlines()[0][:160]}"}
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        row.update(memory_bytes=int(stats["peak_bytes_in_use"]), memory_source="peak_bytes_in_use")
    return {**row, "status": "ok", "steps_per_sec": steps / seconds, "loss": float(metrics["loss"])}


def measure_in_subprocess(method: str, impl: str, length: int) -> dict:
    """``measure`` in a fresh process (so ``peak_bytes_in_use`` is this configuration's alone)."""
    row = {"method": method, "impl": impl, "length": length}
    args = [sys.executable, os.path.abspath(__file__), f"--one={method},{impl},{length}", f"--batch={_BATCH.value}",
            f"--steps={_STEPS.value}", f"--repeats={_REPEATS.value}", f"--max_memory_gb={_MAX_MEMORY_GB.value}",
            f"--config={_CONFIG.value}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": f"failed: exit {proc.returncode}: {tail[:160]}"}


def default_impls() -> list[str]:
    import jax

    return ["xla"] if jax.devices()[0].platform == "cpu" else ["xla", "pallas"]


def main(argv):
    del argv
    import jax

    kw = dict(batch=_BATCH.value, steps=_STEPS.value, repeats=_REPEATS.value,
              max_bytes=_MAX_MEMORY_GB.value * GB, config_path=_CONFIG.value)
    if _ONE.value:
        method, impl, length = _ONE.value.split(",")
        print(ROW_PREFIX + json.dumps(measure(method, impl, int(length), **kw)), flush=True)
        return
    impls = _IMPLS.value or default_impls()
    lengths = [int(n) for n in _LENGTHS.value]
    platform = jax.devices()[0].platform
    isolate = _ISOLATE.value == "yes" or (_ISOLATE.value == "auto" and platform != "cpu")
    device = shared.device_description()
    print(f"device: {device}; batch {_BATCH.value}, impls {impls}, {'isolated' if isolate else 'in-process'}")
    rows = []
    for method, impl in plan(_METHODS.value, impls):
        for n in lengths:
            row = measure_in_subprocess(method, impl, n) if isolate else measure(method, impl, n, **kw)
            rows.append(row)
            shown = f"{row['steps_per_sec']:8.2f} steps/s" if row["status"] == "ok" else row["status"][:70]
            print(f"{method:16s} {impl:6s} {n:6d}  {shown}  {row.get('memory_bytes', 0) / GB:7.2f} GB", flush=True)
            if row["status"].startswith("refused"):
                break  # longer lengths would only be refused again
    sources = sorted({r["memory_source"] for r in rows if "memory_source" in r and r["status"] == "ok"})
    stamp = {"date": shared.today(), "device": device, "batch": _BATCH.value, "steps": _STEPS.value,
             "config": _CONFIG.value}
    base = _OUT.value
    shared.write_jsonl(base + ".jsonl", rows, stamp)
    table = tables(rows, lengths, impls)
    memory_note = {"memory_analysis": "XLA's planned peak of one step (compiled.memory_analysis(): arguments + "
                                      "outputs + temporaries)",
                   "peak_bytes_in_use": "device.memory_stats()['peak_bytes_in_use'] after the steps, one process "
                                        "per configuration"}
    with open(base + ".md", "w") as f:
        command = " ".join(["python benchmarks/lra_efficiency.py", *sys.argv[1:]])
        f.write(f"# LRA efficiency (Table 2 layout)\n\n`{command}`\n\n{stamp['date']}, {device}. "
                f"`{_CONFIG.value}` model "
                f"(forward + backward + optimizer update, the trainer's jitted step), batch {_BATCH.value}, "
                f"random byte tokens, lengths include CLS; best of {_REPEATS.value} runs of {_STEPS.value} steps. "
                f"Ratios are to softmax with the same impl at the same length in this run. Memory: "
                + "; ".join(memory_note[s] for s in sources) + " (GB = 2^30 bytes).\n\n" + table)
    name = lambda r: f"{r['method']} ({r['impl']})" if len(impls) > 1 else r["method"]  # noqa: E731
    shared.plot([{**r, "method": name(r)} for r in rows], base + ".png", time_key="steps_per_sec",
                time_label="train steps/s", baseline=name({"method": "softmax", "impl": impls[0]}),
                memory_label="peak MiB" if sources == ["peak_bytes_in_use"] else "planned peak MiB")
    print("\n" + table)
    print(f"wrote {base}.jsonl, .md and .png")


if __name__ == "__main__":
    app.run(main)
