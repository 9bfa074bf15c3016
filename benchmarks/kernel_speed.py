"""Kernel benchmark: every dense-attention backend side by side, and effjax's block-sparse / chunked linear kernels.

  python benchmarks/kernel_speed.py            # GPU: batch 4, 16 heads, head_dim 64 and 128, lengths 1K..32K, bf16
  python benchmarks/kernel_speed.py --small    # CPU: tiny sizes, kernels interpreted (proves the script runs)
  python benchmarks/kernel_speed.py --lengths=1024,4096 --head_dims=128 --causal
  python benchmarks/kernel_speed.py --patterns=bidirectional,causal --budget=240   # both, stop starting at 240 s

For each length, head_dim and pattern (bidirectional, causal) it times, on one device in one run, the forward
and forward+backward (gradients of sum(out * ct) with respect to q, k, v) of:
  ``flash``           kernels.flash_attention (effjax's Triton kernel: dispatch backend "triton")
  ``flash_dropout``   the same with attention dropout 0.1 (the cost of the in-kernel keep-bit hash)
  ``xla``             effjax.attention.softmax.attend (plain JAX; XLA fuses what it can)
  ``cudnn``           kernels.gpu_cudnn (jax.nn.dot_product_attention(implementation="cudnn"))
  ``mosaic_gpu``      kernels.gpu_mosaic (JAX's Mosaic GPU FlashAttention-3 kernel, Hopper; no causal backward;
                      float16 where the others run bfloat16: it lowers float16 only)
  ``tokamax``         kernels.gpu_tokamax (tokamax's Mosaic GPU / Triton kernels, when tokamax is installed)
  ``pallas_mha``      jax.experimental.pallas.ops.gpu.attention.mha (JAX's shipped Triton kernel)
  ``linear_chunked``  kernels.linear_attention.chunked_linear_attention on elu+1 features, if that module exists
  ``linear_xla``      effjax.attention.kernel_attention.normalized_attention (the XLA chunked scan) on the same features
  ``block_sparse_10`` / ``_25``  kernels.block_sparse at 10% / 25% block density (random per-head layouts
                      holding the diagonal), compared with dense ``flash``.
A backend module's pass is skipped with its ``supports`` reason when it cannot run (no GPU, not Hopper, not
installed, a dtype). Time is the median of ``--repeats`` runs after a warm-up. TFLOP/s uses the FLOPs the
computation needs (softmax: 4 B H Lq Lk D forward, halved when causal, x density for block-sparse; backward
2.5x forward; linear: 4 B H L D (D + chunk)), not what an implementation spends. Peak memory is what XLA plans for the
jitted step (arguments + outputs + temporaries, ``memory_analysis``); a step planned over
``--max_memory_gb`` is skipped, not run. Speedups are reference time / this time at the same shape and pass.

``--budget`` seconds: after that no measurement starts beyond the first length; the rest get a "skipped: time
budget" row (lengths run in the order given, so list the ones that matter most first). Rows are appended to the
.jsonl as they are measured, so a run killed from outside keeps what it finished.

Writes ``benchmarks/results/kernels_<device>.{jsonl,md,png}`` (``--out`` to change the path and basename) and
``kernels_<device>_auto_table.json``: the order ``impl="auto"`` would try per op and length on this platform
(``kernels.dispatch.table_from_measurements``); copied to ``kernels/auto_table.json`` it becomes the shipped one.
"""

import datetime
import importlib
import json
import math
import os
import re
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes (batch 1, 2 heads, head_dim 16/32, lengths 64/128), "
                           "float32, kernels interpreted: for CPU, to prove the script works.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Sequence lengths, run in this order (default 1K..32K; --small: "
                              "64,128).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", None, "Head dims (default 64,128; --small: 16,32).")
_BATCH = flags.DEFINE_integer("batch", None, "Batch (default 4; --small: 1).")
_HEADS = flags.DEFINE_integer("heads", None, "Heads (default 16; --small: 2).")
_IMPLS = flags.DEFINE_list("impls", [], "Implementations to run (default: all).")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal attention (default bidirectional); see --patterns.")
_PATTERNS = flags.DEFINE_list("patterns", [], "Patterns to run, of bidirectional,causal (default: causal with "
                              "--causal, else bidirectional).")
_BUDGET = flags.DEFINE_float("budget", 0.0, "Seconds after which no measurement starts, except at the first "
                             "length (0: no limit).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (the median is kept).")
_MAX_MEMORY_GB = flags.DEFINE_float("max_memory_gb", 60.0, "Skip steps whose planned memory exceeds this.")
_OUT = flags.DEFINE_string("out", None, "Path and basename of the outputs (default "
                           "benchmarks/results/kernels_<device>).")

IMPLS = ("flash", "flash_dropout", "xla", "cudnn", "mosaic_gpu", "tokamax", "pallas_mha", "linear_chunked",
         "linear_xla", "block_sparse_10", "block_sparse_25")
BACKEND_MODULES = {"cudnn": "gpu_cudnn", "mosaic_gpu": "gpu_mosaic", "tokamax": "gpu_tokamax"}  # dispatch backends
REFERENCES = {  # speedup columns: which implementations each one is compared with
    "flash": ("xla", "cudnn", "mosaic_gpu", "tokamax", "pallas_mha"),
    "flash_dropout": ("flash",),
    "linear_chunked": ("linear_xla", "flash"),
    "block_sparse_10": ("flash",),
    "block_sparse_25": ("flash",),
}
SPEEDUP_COLUMNS = ("xla", "cudnn", "mosaic_gpu", "tokamax", "pallas_mha", "flash", "linear_xla")


def device_slug(kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'; a CPU is 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "device"


def random_layout(heads: int, blocks: int, density: float, seed: int = 0):
    """numpy bool [heads, blocks, blocks]: the diagonal plus random tiles up to ``density`` of all tiles."""
    import numpy as np

    rng = np.random.RandomState(seed)
    layout = np.zeros((heads, blocks, blocks), bool)
    want = max(blocks, round(density * blocks * blocks))
    for h in range(heads):
        layout[h][np.diag_indices(blocks)] = True
        off = np.flatnonzero(~layout[h])
        np.put(layout[h], rng.choice(off, min(len(off), want - blocks), replace=False), True)
    return layout


def linear_module():
    """kernels.linear_attention, or None (with a message) when that module is not there yet."""
    try:
        return importlib.import_module("effjax.kernels.linear_attention")
    except ImportError as error:
        print(f"kernels.linear_attention not importable ({error}); skipping linear_chunked and linear_xla.")
        return None


def build(impl: str, *, head_dim: int, length: int, batch: int, heads: int, causal: bool, small: bool,
          grad: bool = True):
    """(fn(q, k, v) -> out, flop multiplier relative to dense softmax forward) or raises to refuse; ``grad``: the
    pass differentiates it (Mosaic GPU has a causal forward only)."""
    import jax
    import jax.numpy as jnp

    from effjax.attention import softmax
    from effjax.kernels import block_sparse, dropout, flash_attention

    interpret = jax.default_backend() != "gpu"
    scale = 1.0 / math.sqrt(head_dim)
    if impl == "flash":
        return (lambda q, k, v: flash_attention.flash_attention(q, k, v, causal=causal, interpret=interpret)), 1.0
    if impl == "flash_dropout":
        seed = dropout.seed_from_key(jax.random.key(0))
        return (lambda q, k, v: flash_attention.flash_attention(q, k, v, causal=causal, interpret=interpret,
                                                                dropout_rate=0.1, dropout_seed=seed)), 1.0
    if impl == "xla":
        return (lambda q, k, v: softmax.attend(q, k, v, causal=causal)), 1.0
    if impl in BACKEND_MODULES:  # refusals come per pass from the module's supports (see measure)
        module = importlib.import_module(f"effjax.kernels.{BACKEND_MODULES[impl]}")
        extra = {"grad": grad} if impl == "mosaic_gpu" else {}
        return (lambda q, k, v: module.attention(q, k, v, causal=causal, **extra)), 1.0
    if impl == "pallas_mha":
        from jax.experimental.pallas.ops.gpu import attention as mha_lib

        block = min(128, length)
        sizes = mha_lib.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, length),
                                   block_kv_dkv=min(32, length), block_q_dq=min(32, length),
                                   block_kv_dq=min(32, length))
        return (lambda q, k, v: mha_lib.mha(q, k, v, None, sm_scale=scale, causal=causal, block_sizes=sizes,
                                            interpret=interpret)), 1.0
    if impl.startswith("linear_"):
        module = linear_module()
        if module is None:
            raise NotImplementedError("kernels.linear_attention is not there")
        chunk = 16 if small else 64

        def features(x):
            return jax.nn.elu(x.astype(jnp.float32)).astype(x.dtype) + 1

        # Linear attention's own FLOPs, as a multiple of dense softmax's forward (4 L^2 D).
        mult = (head_dim + chunk) / length / (0.5 if causal else 1.0)
        if impl == "linear_chunked":
            return (lambda q, k, v: module.chunked_linear_attention(
                features(q), features(k), v, causal=causal, chunk_size=chunk, interpret=interpret)), mult
        # The XLA baseline is effjax's chunked linear attention (a lax.scan over chunks), not an O(L^2) reference.
        from effjax.attention import kernel_attention

        return (lambda q, k, v: kernel_attention.normalized_attention(
            features(q), features(k), v, causal=causal, chunk_size=chunk).astype(q.dtype)), mult
    if impl.startswith("block_sparse_"):
        density = int(impl.rsplit("_", 1)[1]) / 100
        block = 16 if small else 64
        layout = random_layout(heads, -(-length // block), density)
        actual = layout.mean()
        return (lambda q, k, v: block_sparse.block_sparse_attention(
            q, k, v, layout, block_size=block, causal=causal, interpret=interpret)), float(actual)
    raise ValueError(f"bench: unknown implementation {impl!r}; known: {', '.join(IMPLS)}.")


def backend_reason(impl, *, head_dim, length, batch, heads, causal, dtype, grad) -> str | None:
    """A dispatch backend's ``supports`` reason for this shape and pass (None: it runs; not a backend: None)."""
    if impl not in BACKEND_MODULES:
        return None
    import jax

    try:
        module = importlib.import_module(f"effjax.kernels.{BACKEND_MODULES[impl]}")
    except ImportError as error:
        return f"not importable ({error})"
    shape = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
    return module.supports("attention", dict(q=shape, k=shape, v=shape, causal=causal, grad=grad))


def impl_dtype(impl: str, dtype):
    """The dtype ``impl`` runs in: ``dtype``, except Mosaic GPU's attention (its tiles are float16: it lowers
    float16 only), which runs float16 where the others run bfloat16 (the same tensor-core rate on Hopper)."""
    import jax.numpy as jnp

    return jnp.float16 if impl == "mosaic_gpu" and jnp.dtype(dtype) == jnp.bfloat16 else dtype


def measure(impl, *, head_dim, length, batch, heads, causal, small, dtype, repeats, max_bytes):
    """Rows (one per pass: 'fwd', 'fwd+bwd') with status, seconds, tflops and memory_bytes."""
    import jax
    import jax.numpy as jnp

    base = {"impl": impl, "head_dim": head_dim, "length": length, "causal": causal}
    if impl_dtype(impl, dtype) is not dtype:
        dtype = impl_dtype(impl, dtype)
        base["dtype"] = jnp.dtype(dtype).name  # overrides the run's dtype in the .jsonl stamp
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, length, heads, head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys[:3])
    ct = jax.random.normal(keys[3], shape, jnp.float32).astype(dtype)
    dense = 4.0 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    rows = []
    for name in ("fwd", "fwd+bwd"):
        row = {**base, "pass": name}
        grad = name != "fwd"
        reason = backend_reason(impl, head_dim=head_dim, length=length, batch=batch, heads=heads, causal=causal,
                                dtype=dtype, grad=grad)
        if reason:
            rows.append({**row, "status": f"refused: {reason[:120]}"})
            continue
        try:
            fn, mult = build(impl, head_dim=head_dim, length=length, batch=batch, heads=heads, causal=causal,
                             small=small, grad=grad)
        except (NotImplementedError, ValueError, ImportError) as error:
            rows.append({**row, "status": f"refused: {str(error).splitlines()[0][:120]}"})
            continue

        def loss(q, k, v, fn=fn):
            return jnp.sum((fn(q, k, v) * ct).astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2))) if grad else jax.jit(fn)
        try:
            compiled = step.lower(q, k, v).compile()
        except Exception as error:  # noqa: BLE001  (a refusal inside lowering: unsupported shape, no cuDNN, ...)
            rows.append({**row, "status": f"refused: {type(error).__name__}: {str(error).splitlines()[0][:100]}"})
            continue
        analysis = compiled.memory_analysis()
        memory = None
        if analysis is not None:
            memory = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                         + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
            row["memory_bytes"] = memory
        if memory is not None and memory > max_bytes:
            rows.append({**row, "status": "skipped: planned memory over --max_memory_gb"})
            continue
        try:
            jax.block_until_ready(compiled(q, k, v))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times.append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001  (a failure at run time, e.g. out of memory: the row says so)
            rows.append({**row, "status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"})
            continue
        seconds = statistics.median(times)
        flops = dense * mult * (1.0 if name == "fwd" else 3.5)
        rows.append({**row, "status": "ok", "seconds": seconds, "tflops": flops / seconds / 1e12})
    return rows


def key(r, impl=None):
    return (impl or r["impl"], r["head_dim"], r["length"], r.get("causal", False), r["pass"])


def add_speedups(rows):
    """Adds 'x_<ref>' = ref seconds / seconds for each reference of the row's implementation."""
    by = {key(r): r for r in rows}
    for r in rows:
        for ref in REFERENCES.get(r["impl"], ()):
            other = by.get(key(r, ref), {})
            if r.get("status") == "ok" and other.get("status") == "ok":
                r[f"x_{ref}"] = other["seconds"] / r["seconds"]
    return rows


def table(rows) -> str:
    """Markdown: one line per (implementation, head_dim, length, pattern, pass)."""
    head = ("| impl | head_dim | length | causal | pass | ms | TFLOP/s | peak MiB | "
            + " | ".join(f"x {c}" for c in SPEEDUP_COLUMNS) + " |")
    lines = [head, "|---" * (8 + len(SPEEDUP_COLUMNS)) + "|"]
    for r in rows:
        mem = f"{r['memory_bytes'] / 2**20:.0f}" if "memory_bytes" in r else "-"
        if r["status"] != "ok":
            cells = [r["status"][:90].replace("|", "/"), "", mem]
        else:
            cells = [f"{r['seconds'] * 1e3:.3f}", f"{r['tflops']:.3g}", mem]
        speedups = [f"{r[f'x_{c}']:.2f}" if f"x_{c}" in r else "-" for c in SPEEDUP_COLUMNS]
        name = f"`{r['impl']}`" + (f" ({r['dtype']})" if "dtype" in r else "")
        lead = (f"| {name} | {r['head_dim']} | {r['length']} | {'yes' if r.get('causal') else 'no'} | "
                f"{r['pass']} | ")
        lines.append(lead + " | ".join(cells + speedups) + " |")
    return "\n".join(lines)


def plot(rows, head_dims, patterns, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, c, p) for d in head_dims for c in patterns for p in ("fwd", "fwd+bwd")]
    cols = 2 * len(patterns)
    fig, axes = plt.subplots(len(head_dims), cols, figsize=(6 * cols, 4.5 * len(head_dims)), squeeze=False)
    for index, (d, causal, p) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for impl in IMPLS:
            ok = sorted((r for r in rows if r["impl"] == impl and r["head_dim"] == d and r["pass"] == p
                         and r.get("causal", False) == causal and r["status"] == "ok"), key=lambda r: r["length"])
            if ok:
                ax.loglog([r["length"] for r in ok], [r["seconds"] * 1e3 for r in ok], marker="o", ms=3,
                          label=impl, lw=2.5 if impl == "flash" else 1)
        ax.set(xlabel="sequence length", ylabel="ms",
               title=f"head_dim {d}, {'causal' if causal else 'bidirectional'}, {p}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def patterns_of(names, causal_flag: bool) -> list[bool]:
    """--patterns as causal flags (default: [--causal])."""
    if not names:
        return [causal_flag]
    known = {"bidirectional": False, "causal": True}
    for name in names:
        if name not in known:
            raise ValueError(f"bench: unknown pattern {name!r}; known: bidirectional, causal.")
    return [known[name] for name in names]


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    start = time.monotonic()
    small = _SMALL.value
    lengths = [int(n) for n in (_LENGTHS.value or (["64", "128"] if small else
                                                   ["1024", "2048", "4096", "8192", "16384", "32768"]))]
    head_dims = [int(d) for d in (_HEAD_DIMS.value or (["16", "32"] if small else ["64", "128"]))]
    patterns = patterns_of(_PATTERNS.value, _CAUSAL.value)
    batch = _BATCH.value or (1 if small else 4)
    heads = _HEADS.value or (2 if small else 16)
    dtype = jnp.float32 if small else jnp.bfloat16
    impls = _IMPLS.value or list(IMPLS)
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"bench: unknown implementation {impl!r}; known: {', '.join(IMPLS)}.")
    kind = jax.devices()[0].device_kind
    device = "cpu" if jax.default_backend() == "cpu" else device_slug(kind)
    mode = "interpreted" if jax.default_backend() != "gpu" else "compiled"
    shown_patterns = " and ".join("causal" if c else "bidirectional" for c in patterns)
    print(f"device: {kind} ({device}); batch {batch}, {heads} heads, {jnp.dtype(dtype).name}, {shown_patterns}, "
          f"Pallas kernels {mode}", flush=True)
    stamp = {"date": datetime.date.today().isoformat(), "device": kind, "batch": batch, "heads": heads,
             "dtype": jnp.dtype(dtype).name, "kernels": mode}
    base = _OUT.value or os.path.join(RESULTS, f"kernels_{device}")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    rows = []
    with open(base + ".jsonl", "w") as log:  # one line per row as it comes; rewritten with speedups at the end
        for n in lengths:  # in the order given: a budget cuts the last ones (the first always runs)
            for d in head_dims:
                for causal in patterns:
                    for impl in impls:
                        if _BUDGET.value and n != lengths[0] and time.monotonic() - start > _BUDGET.value:
                            new = [{"impl": impl, "head_dim": d, "length": n, "causal": causal, "pass": p,
                                    "status": f"skipped: time budget ({_BUDGET.value:g} s) spent"}
                                   for p in ("fwd", "fwd+bwd")]
                        else:
                            new = measure(impl, head_dim=d, length=n, batch=batch, heads=heads, causal=causal,
                                          small=small, dtype=dtype, repeats=_REPEATS.value,
                                          max_bytes=_MAX_MEMORY_GB.value * 2**30)
                        for row in new:
                            rows.append(row)
                            log.write(json.dumps({**stamp, **row}) + "\n")
                            log.flush()
                            shown = f"{row['seconds'] * 1e3:10.3f} ms" if row["status"] == "ok" else row["status"][:90]
                            print(f"{impl:16s} d={d:<4d} L={n:<6d} {'causal' if causal else 'bidir':6s} "
                                  f"{row['pass']:8s} {shown}", flush=True)
    add_speedups(rows)
    with open(base + ".jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")
    text = table(rows)
    with open(base + ".md", "w") as f:
        f.write(f"{stamp['date']}, {kind}; batch {batch}, {heads} heads, {stamp['dtype']}, {shown_patterns}, "
                f"Pallas kernels {mode}. Median time; TFLOP/s of the needed FLOPs; peak = XLA's planned memory; "
                f"x ref = ref time / this time. {time.monotonic() - start:.0f} s in all.\n\n" + text + "\n")
    plot(rows, head_dims, patterns, base + ".png")
    from effjax.kernels import dispatch

    with open(base + "_auto_table.json", "w") as f:  # copy to kernels/auto_table.json to make it 'auto''s order
        json.dump(dispatch.table_from_measurements(rows, jax.default_backend()), f, indent=1)
    print("\n" + text)
    print(f"\nwrote {base}.jsonl, .md, .png and _auto_table.json ({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
