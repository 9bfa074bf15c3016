"""Long Range Arena-style efficiency table: every attention method's forward+backward time and memory vs softmax.

  python benchmarks/attention_efficiency.py                     # all methods, lengths 1K..16K
  python benchmarks/attention_efficiency.py --methods=softmax,performer --lengths=1024,2048

For each method (paper defaults, plus ``grid`` for the grid mixers at non-square lengths) and each length,
times one jitted step of forward + backward (gradients of a scalar loss with respect to q, k, v and the
method's params) on batch x length x heads x head_dim float32 inputs, bidirectional and unmasked as in
LRA's efficiency benchmark (Tay et al. 2021, Table 2), or causal with ``--causal`` (the recurrent families).
Memory is the peak XLA plans for that step (arguments + outputs + temporaries, from
``compiled.memory_analysis()``); a configuration whose plan exceeds ``--max_memory_gb`` is skipped, not run.
Time is the best of ``--repeats`` runs after a warm-up.

Writes ``benchmarks/results/attention_efficiency.{jsonl,md,png}`` (``--out``): the rows, a table of time and memory
relative to softmax at each length, and log-log plots of time and memory against length.
"""

import functools
import math
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import efficiency_common as shared  # noqa: E402

_METHODS = flags.DEFINE_list("methods", [], "Methods to run (default: all registered).")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head width.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration (the best is kept).")
_MAX_MEMORY_GB = flags.DEFINE_float("max_memory_gb", 6.0, "Skip configurations whose planned memory exceeds this.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal calls (LM-style; the recurrent families need it) instead of "
                            "LRA's bidirectional ones; methods without causal are then refused.")
_IMPL = flags.DEFINE_string("impl", "xla", "impl for the methods with a kernel path (e.g. pallas: flash for softmax, "
                            "the chunked kernels for the linear and recurrent families); others run XLA.")
_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "attention_efficiency"),
                           "Path and basename of the .jsonl, .md and .png written.")


def grid_for(length: int) -> tuple[int, int]:
    """The most nearly square (h, w) with h * w == length, for grid mixers at non-square lengths."""
    h = math.isqrt(length)
    while length % h:
        h -= 1
    return h, length // h


def build_step(name: str, length: int, batch: int, heads: int, head_dim: int, causal: bool = False, impl: str = "xla"):
    """(jitted forward+backward, its arguments) for method ``name`` at ``length``."""
    import jax
    import jax.numpy as jnp

    from effjax import attention

    params = {}
    if "grid" in attention.defaults(name):
        params["grid"] = grid_for(length)
    if impl != "xla" and attention.capabilities(name).pallas:
        params["impl"] = impl
    module = attention.make(name, **params)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (batch, length, heads, head_dim), jnp.float32) for kk in keys[:3])
    variables = jax.jit(functools.partial(module.init, causal=causal))(keys[3], q, k, v)

    def loss(variables, q, k, v):
        return jnp.sum(jnp.square(module.apply(variables, q, k, v, causal=causal)))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return step, (variables, q, k, v)


def measure(name: str, length: int, *, batch=1, heads=4, head_dim=32, repeats=3, max_bytes=6 * 2**30,
            causal=False, impl="xla") -> dict:
    """One row: status ('ok', 'refused: why', 'skipped: why'), planned memory_bytes and best seconds."""
    import jax

    row = {"method": name, "length": length}
    try:
        step, args = build_step(name, length, batch, heads, head_dim, causal, impl)
        compiled = step.lower(*args).compile()
    except (NotImplementedError, ValueError) as error:
        return {**row, "status": f"refused: {str(error).splitlines()[0][:120]}"}
    memory = shared.planned_bytes(compiled)
    row["memory_bytes"] = memory
    if memory > max_bytes:
        return {**row, "status": "skipped: planned memory over --max_memory_gb"}
    jax.block_until_ready(compiled(*args))  # warm-up
    seconds = shared.best_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return {**row, "status": "ok", "seconds": seconds}


def ratio_table(rows: list[dict], lengths: list[int]) -> str:
    """Markdown: per method and length, 'time x / memory x' relative to softmax at that length."""
    by = {(r["method"], r["length"]): r for r in rows}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "softmax", m))
    head = "| method | " + " | ".join(f"{shared.length_label(n)} time / mem" for n in lengths) + " | time 8K / 1K |"
    lines = [head, "|---" * (len(lengths) + 2) + "|"]
    for method in methods:
        cells = []
        for n in lengths:
            r, base = by.get((method, n), {}), by.get(("softmax", n), {})
            if r.get("status") != "ok":
                cells.append("refused" if str(r.get("status", "")).startswith("refused") else "-")
            elif base.get("status") != "ok":
                cells.append(f"{r['seconds'] * 1e3:.0f} ms / {r['memory_bytes'] / 2**20:.0f} MiB")
            else:
                cells.append(f"{r['seconds'] / base['seconds']:.2f} / {r['memory_bytes'] / base['memory_bytes']:.2f}")
        first, last = by.get((method, 1024), {}), by.get((method, 8192), {})
        growth = (f"{last['seconds'] / first['seconds']:.1f}"
                  if first.get("status") == last.get("status") == "ok" else "-")
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from effjax import attention

    methods = _METHODS.value or attention.names()
    lengths = [int(n) for n in _LENGTHS.value]
    max_bytes = _MAX_MEMORY_GB.value * 2**30
    device = shared.device_description()
    print(f"device: {device}; batch {_BATCH.value}, heads {_HEADS.value}, head_dim {_HEAD_DIM.value}, float32")
    rows = []
    for name in methods:
        for n in lengths:
            row = measure(name, n, batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                          repeats=_REPEATS.value, max_bytes=max_bytes, causal=_CAUSAL.value, impl=_IMPL.value)
            rows.append(row)
            shown = f"{row['seconds'] * 1e3:9.1f} ms" if row["status"] == "ok" else row["status"][:60]
            print(f"{name:24s} {n:6d}  {shown}  {row.get('memory_bytes', 0) / 2**20:8.0f} MiB", flush=True)
            if row["status"] != "ok":
                break  # longer lengths would only be refused or skipped again
    stamp = {"date": shared.today(), "device": device, "batch": _BATCH.value, "causal": _CAUSAL.value,
             "impl": _IMPL.value, "heads": _HEADS.value, "head_dim": _HEAD_DIM.value, "dtype": "float32"}
    base = _OUT.value
    shared.write_jsonl(base + ".jsonl", rows, stamp)
    table = ratio_table(rows, lengths)
    with open(base + ".md", "w") as f:
        f.write(f"{stamp['date']}, {device}; batch {_BATCH.value}, {_HEADS.value} heads x {_HEAD_DIM.value}, "
                f"float32, forward+backward, {'causal' if _CAUSAL.value else 'bidirectional'}, relative to softmax "
                "at the same length.\n\n" + table + "\n")
    shared.plot(rows, base + ".png")
    print("\n" + table)
    print(f"\nwrote {base}.jsonl, .md and .png")


if __name__ == "__main__":
    app.run(main)
