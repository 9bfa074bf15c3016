"""Decoding speed and cache size per attention method, against softmax with its key/value cache (issue 16).

  python benchmarks/decode.py                                        # every decoding method, 1K-64K, batch 1 and 16
  python benchmarks/decode.py --methods=softmax,retnet --contexts=1024,4096 --batches=1
  python benchmarks/decode.py --batches=1,64 --device_name=h200       # the GPU table (decode_h200.*)

For each context length C, batch B and method (default: every method in ``effjax.attention.supporting('decode')``,
softmax first), a decoder LM (``effjax.models.decoder_lm``; 2 layers, embed 128, 4 heads, float32 by default)
with every layer that method gets the cache for C tokens (``model.init_cache(B, C)``), a prefill of C - n - 1
random tokens (timed once after an ahead-of-time compile, twice when the first run is short: the faster is kept),
then one warm-up step and n timed steps (``--steps``) of one token per sequence, greedy, the step jitted once with
the cache donated, each step timed: tokens/s = B / the median step time (the tables and plot: steady on a shared
machine, where a few descheduled steps can halve B * n / their total time, ``tokens_per_s`` in the rows). Cache
bytes per sequence are the cache pytree's bytes (``decoding.cache_bytes``) over B.

Memory and time guards: each prefill and step is compiled first, and a call whose planned memory (XLA's
``memory_analysis``: arguments + outputs + temporaries) exceeds ``--memory_gb`` is not run ("skipped: memory");
neither is a prefill whose time, extrapolated from the method's shorter contexts (quadratically from one, with the
fitted exponent from two), exceeds ``--cell_seconds`` ("skipped: time"). Where the prefill is skipped the steps
still run, from the empty cache at the same positions (``decode_from: empty``): a step's cost depends on the
cache's shapes and the positions, not the values in the slots (a key/value step reads the slots up to its position,
``decoding.kv_attend``; a recurrent step updates a fixed state), so its tokens/s stand. n shrinks to fit
``--cell_seconds`` when the warm-up step is slow.

Methods are measured side by side within each (context, batch); ratios are against softmax measured in the same run:
on a rerun (cells already in the results file are kept unless ``--force``), softmax is measured again for every
(context, batch) where another method runs, as that run's baseline.

Writes ``benchmarks/results/decode.{jsonl,md,png}`` (``--out``; ``--device_name=X`` makes it ``decode_X.*``): one
row per cell (resumable), the tables (ratios to softmax and absolute numbers), and log-log plots of tokens/s and
cache bytes per sequence against context at the smallest batch.
"""

import json
import math
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import decode_model  # noqa: E402
from benchmarks import efficiency_common as shared  # noqa: E402
from effjax.files import write_atomic  # noqa: E402

_METHODS = flags.DEFINE_list("methods", [], "Methods (default: every method that declares decode, at run time).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "16384", "65536"], "Context lengths (cache tokens).")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 32, "Timed decode steps per cell (after one warm-up step).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers.")
_EMBED = flags.DEFINE_integer("embed", 128, "Embedding width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (head_dim = embed / heads).")
_MLP = flags.DEFINE_integer("mlp", 512, "MLP width.")
_VOCAB = flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 65536, "The model's max_length (its learned positions; hyena's and "
                                   "kernelized_rpe's params); raised to the longest context.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 8.0, "Skip a prefill or step whose planned memory exceeds this.")
_CELL_SECONDS = flags.DEFINE_float("cell_seconds", 120.0, "Time guard: skip a prefill estimated to take longer, "
                                   "and cut the steps to fit it.")
_FORCE = flags.DEFINE_bool("force", False, "Rerun cells already in the results file.")
_DEVICE_NAME = flags.DEFINE_string("device_name", "", "Suffix of the output files (decode_<name>.*), e.g. h200.")
_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "decode"), "Path and basename of the outputs.")

BASELINE = "softmax"


def model_label(layers: int, embed: int, heads: int, mlp: int, vocab: int) -> str:
    return f"{layers} layers x embed {embed}, {heads} heads x {embed // heads}, mlp {mlp}, vocab {vocab}, float32"


class Bench:
    """One decoder LM per method (params made once; ``max_length`` at least the longest context), cell by cell."""

    def __init__(self, *, layers, embed, heads, mlp, vocab, max_length, steps, max_bytes, cell_seconds):
        self.settings = dict(layers=layers, embed=embed, heads=heads, mlp=mlp, vocab=vocab)
        self.max_length, self.steps, self.max_bytes, self.cell_seconds = max_length, steps, max_bytes, cell_seconds
        self.models = {}
        self.prefill_times = {}  # (method, batch) -> {context: seconds}, for the time guard

    def model(self, method: str):
        if method not in self.models:
            self.models[method] = decode_model.decoder_lm_for(method, self.max_length, **self.settings)
        return self.models[method]

    def prefill_estimate(self, method: str, batch: int, context: int):
        """Seconds the prefill at ``context`` should take, from the method's shorter contexts (None: no data)."""
        done = sorted((c, t) for c, t in self.prefill_times.get((method, batch), {}).items() if c < context)
        if not done:
            return None
        (c1, t1) = done[-1]
        power = 2.0
        if len(done) >= 2:
            (c0, t0) = done[-2]
            power = min(2.0, max(1.0, math.log(max(t1, 1e-6) / max(t0, 1e-6)) / math.log(c1 / c0)))
        return t1 * (context / c1) ** power

    def measure(self, method: str, context: int, batch: int) -> dict:
        """One cell's row: cache bytes, prefill and decode status, times and planned memory."""
        import jax
        import jax.numpy as jnp
        from flax import linen as nn

        from effjax.attention import decoding

        steps = self.steps
        prompt = context - steps - 1  # the warm-up step and the timed steps fill the cache's last steps + 1 slots
        row = {"method": method, "context": context, "batch": batch, "prefill_tokens": prompt}
        if prompt < 1:
            return {**row, "status": f"refused: context {context} leaves no prompt before {steps} + 1 steps"}
        try:
            model, variables = self.model(method)
            boxed = jax.eval_shape(lambda: model.init_cache(batch, context))
        except (NotImplementedError, ValueError) as error:
            return {**row, "status": f"refused: {str(error).splitlines()[0][:160]}"}
        total = decoding.cache_bytes(boxed)
        row["cache_bytes_per_seq"] = total // batch
        if total > self.max_bytes:
            return {**row, "status": "skipped: memory (the cache alone)"}
        abstract = nn.meta.unbox(boxed)
        empty = jax.jit(lambda: nn.meta.unbox(model.init_cache(batch, context)))

        def prefill_fn(variables, tokens, cache):
            logits, cache = model.apply(variables, tokens, cache=cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

        step_fn = decode_model.greedy_step(model)
        token_spec = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
        try:
            start = time.perf_counter()
            prefill = jax.jit(prefill_fn, donate_argnums=(2,)).lower(variables, token_spec, abstract).compile()
            step = jax.jit(step_fn, donate_argnums=(2,)).lower(
                variables, jax.ShapeDtypeStruct((batch,), jnp.int32), abstract,
                jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
            row["compile_seconds"] = round(time.perf_counter() - start, 2)
        except (NotImplementedError, ValueError) as error:
            return {**row, "status": f"refused: {str(error).splitlines()[0][:160]}"}
        row["prefill_memory_bytes"] = shared.planned_bytes(prefill)
        row["step_memory_bytes"] = shared.planned_bytes(step)
        if row["step_memory_bytes"] > self.max_bytes:
            return {**row, "status": "skipped: memory (step)"}

        # Prefill.
        estimate = self.prefill_estimate(method, batch, context)
        if row["prefill_memory_bytes"] > self.max_bytes:
            row["prefill_status"] = (f"skipped: memory ({row['prefill_memory_bytes'] / 2**30:.1f} GiB planned > "
                                     f"{self.max_bytes / 2**30:.0f})")
        elif estimate is not None and estimate > self.cell_seconds:
            row["prefill_status"] = f"skipped: time (~{estimate:.0f} s estimated > {self.cell_seconds:.0f})"
        else:
            tokens = jax.random.randint(jax.random.key(1), (batch, prompt), 1, self.settings["vocab"], jnp.int32)
            best = None
            for attempt in range(2):
                cache = empty()
                jax.block_until_ready(cache)
                start = time.perf_counter()
                token, cache = jax.block_until_ready(prefill(variables, tokens, cache))
                seconds = time.perf_counter() - start
                best = seconds if best is None else min(best, seconds)
                if attempt == 0 and seconds > 2.0:
                    break
                if attempt == 0:
                    del cache
            row.update(prefill_status="ok", prefill_seconds=best, prefill_tokens_per_s=batch * prompt / best)
            self.prefill_times.setdefault((method, batch), {})[context] = best
            del tokens
        if row["prefill_status"] != "ok":
            cache = empty()
            token = jnp.ones((batch,), jnp.int32)
        row["decode_from"] = "prefill" if row["prefill_status"] == "ok" else "empty"

        # Steps: one warm-up, then up to ``steps`` timed (fewer when the warm-up says they would not fit the guard).
        position = jnp.full((batch,), prompt, jnp.int32)
        start = time.perf_counter()
        token, cache, position = jax.block_until_ready(step(variables, token, cache, position))
        warm = time.perf_counter() - start
        count = max(2, min(steps, int(self.cell_seconds / max(warm, 1e-9))))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            token, cache, position = jax.block_until_ready(step(variables, token, cache, position))
            times.append(time.perf_counter() - start)
        measured = decoding.cache_bytes(cache)
        if measured != total:
            raise AssertionError(f"{method}: the cache after decoding holds {measured} bytes, init_cache {total}")
        del cache
        times.sort()
        median = times[len(times) // 2]
        row.update(status="ok", steps=count, decode_seconds=sum(times), tokens_per_s=batch * count / sum(times),
                   step_ms_median=1e3 * median, tokens_per_s_median=batch / median)
        return row


# ---- results file, tables, plot ------------------------------------------------------------------------------


def compact(rows: list[dict]) -> list[dict]:
    """``rows`` less those a later row of the same cell replaced (``--force``, or a rerun after an error), keeping
    the softmax rows other rows' ratios use (their run's baseline)."""
    key = lambda r: (r.get("model"), r.get("steps_requested"), r["method"], r["context"], r["batch"])
    last = {key(r): i for i, r in enumerate(rows)}
    kept = [r for i, r in enumerate(rows) if last[key(r)] == i]
    runs = {(key(r)[:2], r["context"], r["batch"], r.get("run")) for r in kept}
    return [r for i, r in enumerate(rows) if last[key(r)] == i or (
        r["method"] == BASELINE and r.get("status") == "ok"
        and (key(r)[:2], r["context"], r["batch"], r.get("run")) in runs)]


def speed(row: dict) -> float:
    """Tokens/s from the median step (batch / median step time): the tables' and plot's number. On a shared
    machine it is steadier than ``tokens_per_s`` (batch * steps / their total time, also in the rows), which a few
    descheduled steps can halve."""
    return row["batch"] * 1e3 / row["step_ms_median"]


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest(rows: list[dict]) -> dict:
    """(method, context, batch) -> its latest row; softmax's is its row of the run most other methods' rows
    there come from (the baseline their ratios use), else its latest ok row."""
    by = {}
    for row in rows:
        key = (row["method"], row["context"], row["batch"])
        if row["method"] != BASELINE or row.get("status") == "ok" or key not in by:
            by[key] = row
    for (method, context, batch), row in list(by.items()):
        if method != BASELINE:
            continue
        runs = [r.get("run") for (m, c, b), r in by.items() if m != BASELINE and (c, b) == (context, batch)]
        choices = {r.get("run"): r for r in rows if r["method"] == BASELINE and r["context"] == context
                   and r["batch"] == batch and r.get("status") == "ok"}
        if runs and choices:
            by[(method, context, batch)] = choices.get(max(set(runs), key=runs.count), row)
    return by


def baseline_for(rows: list[dict], row: dict):
    """The softmax row measured in ``row``'s run at its context and batch, else the latest softmax row there."""
    same = [r for r in rows if r["method"] == BASELINE and r["context"] == row["context"]
            and r["batch"] == row["batch"] and r.get("status") == "ok"]
    in_run = [r for r in same if r.get("run") == row.get("run")]
    return (in_run or same or [None])[-1]


def _ratio(a, b, digits=2):
    if a is None or b is None or not b:
        return "-"
    value = a / b
    return f"{value:.{digits}f}" if value >= 0.01 else f"{value:.1e}"


def _mib(n):
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def _status_cell(row):
    status = row.get("status", "-")
    return status.split(":")[0] if status.startswith(("refused", "error")) else status.split(" (")[0]


def markdown(rows: list[dict], contexts: list[int], batches: list[int], header: str) -> str:
    """Per batch: a ratio table (tokens/s, cache bytes per sequence, prefill time, each method / softmax in the
    same run) and an absolute one."""
    by = latest(rows)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != BASELINE, m))
    out = [header, ""]
    labels = [shared.length_label(c) for c in contexts]
    for batch in batches:
        out += [f"### Batch {batch}: method / softmax (tokens/s ; cache bytes per sequence ; prefill time)", "",
                "| method | " + " | ".join(labels) + " |", "|---" * (len(contexts) + 1) + "|"]
        for method in methods:
            cells = []
            for c in contexts:
                row = by.get((method, c, batch))
                if row is None:
                    cells.append("-")
                    continue
                if row.get("status") != "ok":
                    cells.append(_status_cell(row))
                    continue
                base = baseline_for(rows, row)
                ok = base is not None and base.get("status") == "ok"
                rate = _ratio(speed(row), speed(base)) if ok else "-"
                size = _ratio(row["cache_bytes_per_seq"], base.get("cache_bytes_per_seq")) if base else "-"
                prefill = (_ratio(row["prefill_seconds"], base["prefill_seconds"])
                           if ok and row.get("prefill_status") == "ok" and base.get("prefill_status") == "ok"
                           else "skip" if row.get("prefill_status") != "ok" else "-")
                other = "" if base is None or base.get("run") == row.get("run") else " *"
                cells.append(f"{rate} ; {size} ; {prefill}{other}")
            out.append(f"| `{method}` | " + " | ".join(cells) + " |")
        if any("*" in line for line in out[-len(methods):]):
            out += ["", "\\* softmax from another run of the script (the same machine and settings)."]
        out += ["", f"### Batch {batch}: absolute (tokens/s ; cache per sequence ; prefill seconds)", "",
                "| method | " + " | ".join(labels) + " |", "|---" * (len(contexts) + 1) + "|"]
        for method in methods:
            cells = []
            for c in contexts:
                row = by.get((method, c, batch))
                if row is None or row.get("status") != "ok":
                    cells.append("-" if row is None else _status_cell(row))
                    continue
                prefill = (f"{row['prefill_seconds']:.3g} s" if row.get("prefill_status") == "ok"
                           else row.get("prefill_status", "-").split(" (")[0])
                cells.append(f"{speed(row):.4g} ; {_mib(row['cache_bytes_per_seq'])} ; {prefill}")
            out.append(f"| `{method}` | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str, batch: int) -> None:
    """Log-log: tokens/s and cache bytes per sequence against context at ``batch``, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = latest(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != BASELINE, m))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(methods):
        ok = sorted((r for (m, _, b), r in by.items() if m == method and b == batch and r.get("status") == "ok"),
                    key=lambda r: r["context"])
        if not ok:
            continue
        style = (dict(lw=2.5, color="black") if method == BASELINE else
                 dict(lw=1.2, color=colors[index % len(colors)], ls=("-", "--", ":")[index // len(colors) % 3]))
        contexts = [r["context"] for r in ok]
        axes[0].loglog(contexts, [speed(r) for r in ok], marker="o", ms=3, label=method, **style)
        axes[1].loglog(contexts, [r["cache_bytes_per_seq"] for r in ok], marker="o", ms=3, **style)
    axes[0].set(xlabel="context (tokens in the cache)", ylabel="decode tokens/s", title=f"decode speed, batch {batch}")
    axes[1].set(xlabel="context (tokens in the cache)", ylabel="cache bytes per sequence",
                title="cache memory per sequence")
    fig.legend(loc="center right", fontsize=8, handlelength=3)
    fig.subplots_adjust(right=0.84)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------------------


def run(*, methods, contexts, batches, steps, layers, embed, heads, mlp, vocab, memory_gb, cell_seconds, force,
        out, max_length=65536) -> list[dict]:
    """Measures every cell not yet in ``out``.jsonl, then writes the .jsonl, .md and .png; returns all rows."""
    from effjax import attention

    methods = list(methods) or attention.supporting("decode")
    methods = [BASELINE, *dict.fromkeys(m for m in methods if m != BASELINE)]
    label = model_label(layers, embed, heads, mlp, vocab)
    device = shared.device_description()
    path = out + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = load(path)  # with --force the new rows supersede the old (the latest row of a cell is shown)
    here = [r for r in rows if r.get("model") == label and r.get("steps_requested", steps) == steps]
    done = set() if force else {(r["method"], r["context"], r["batch"]) for r in here
                                if not r["status"].startswith("error")}
    stamp = {"date": shared.today(), "device": device, "model": label, "steps_requested": steps,
             "run": time.strftime("%Y%m%dT%H%M%S"), "max_length": max(max_length, *contexts)}
    print(f"device: {device}; {label}; {steps} steps; methods: {', '.join(methods)}", flush=True)
    bench = Bench(layers=layers, embed=embed, heads=heads, mlp=mlp, vocab=vocab, max_length=max(max_length, *contexts),
                  steps=steps, max_bytes=memory_gb * 2**30, cell_seconds=cell_seconds)
    for r in here:  # the time guard's data from earlier runs
        if r.get("prefill_status") == "ok":
            bench.prefill_times.setdefault((r["method"], r["batch"]), {})[r["context"]] = r["prefill_seconds"]
    started = time.perf_counter()
    for context in contexts:
        for batch in batches:
            todo = [m for m in methods if (m, context, batch) not in done]
            if not todo:
                continue
            if BASELINE not in todo:
                todo.insert(0, BASELINE)  # the baseline of this run
            for method in todo:
                cell = time.perf_counter()
                try:
                    row = {**stamp, **bench.measure(method, context, batch)}
                except Exception as error:  # a method's bug must not end the others' run: recorded, rerun next time
                    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    row = {**stamp, "method": method, "context": context, "batch": batch,
                           "status": f"error: {message[:200]}"}
                row["cell_seconds"] = round(time.perf_counter() - cell, 2)
                rows = compact([*rows, row])
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
                shown = (f"{speed(row):10.1f} tok/s  prefill "
                         + (f"{row['prefill_seconds']:8.3f} s" if row.get("prefill_status") == "ok"
                            else row.get("prefill_status", "")[:40]) if row["status"] == "ok" else row["status"][:70])
                print(f"{method:20s} C={context:6d} B={batch:3d}  {shown}  cache/seq "
                      f"{_mib(row.get('cache_bytes_per_seq', 0))}  [{row['cell_seconds']:.0f} s]", flush=True)
    print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    rows = compact(rows)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    current = [r for r in rows if r.get("model") == label and r.get("steps_requested", steps) == steps]
    shown_contexts = sorted({r["context"] for r in current})
    shown_batches = sorted({r["batch"] for r in current})
    header = (f"Decoding, {stamp['date']}, {device}; decoder LM {label}; prefill of context - {steps} - 1 tokens, "
              f"then {steps} timed steps (fewer where the time guard cut them), tokens/s = batch / median step time; "
              "each method / softmax measured in the same run at the same context and batch (prefill: time ratio, "
              "lower is faster). 'skip': the prefill did not fit the memory or time guard (its steps ran from the "
              "empty cache: same shapes, same cost).")
    table = markdown(current, shown_contexts, shown_batches, header)
    write_atomic(out + ".md", table + "\n")
    if shown_batches:
        plot(current, out + ".png", min(shown_batches))
    print("\n" + table)
    print(f"wrote {out}.jsonl, .md and .png")
    return rows


def main(argv):
    del argv
    out = _OUT.value + (f"_{_DEVICE_NAME.value}" if _DEVICE_NAME.value else "")
    run(methods=_METHODS.value, contexts=[int(c) for c in _CONTEXTS.value],
        batches=[int(b) for b in _BATCHES.value], steps=_STEPS.value, layers=_LAYERS.value, embed=_EMBED.value,
        heads=_HEADS.value, mlp=_MLP.value, vocab=_VOCAB.value, memory_gb=_MEMORY_GB.value,
        cell_seconds=_CELL_SECONDS.value, force=_FORCE.value, out=out, max_length=_MAX_LENGTH.value)


if __name__ == "__main__":
    app.run(main)
