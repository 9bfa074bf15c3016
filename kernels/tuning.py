"""Tuned block sizes per device and backend, and the autotune command that measures and writes them.

``block_table.json`` (beside this file) maps a device kind (``jax.devices()[0].device_kind``, e.g. "NVIDIA H200")
to ``{backend: {op: {field: value}}}``; the flash kernel's ``BlockSizes`` come from it when the device has an
entry, else from ``flash_attention.DEFAULT_BLOCKS``. No table is shipped: it is written on the hardware by

  python -m effjax.kernels.tuning --lengths=1024,4096 --head_dims=64,128     # on the GPU; --small on a CPU

which times the Triton flash kernel (forward + backward, bf16, causal) over a grid of block sizes at each
shape, keeps the fastest overall (the sum of its times) and writes it atomically (a temp file, then rename).
"""

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_table.json")
FLASH_FIELDS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")


def device_kind() -> str:
    return jax.devices()[0].device_kind


def load(path: str | None = None) -> dict:
    path = path or TABLE_PATH
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def tuned(backend: str, op: str, kind: str | None = None, path: str | None = None) -> dict | None:
    """The measured settings of ``backend``'s ``op`` on this device kind, or None."""
    return load(path).get(kind or device_kind(), {}).get(backend, {}).get(op)


def write(entry: dict, backend: str, op: str, kind: str, path: str | None = None) -> None:
    """Stores ``entry`` for (kind, backend, op), keeping every other entry; atomic on one filesystem."""
    path = path or TABLE_PATH
    table = load(path)
    table.setdefault(kind, {}).setdefault(backend, {})[op] = entry
    scratch = f"{path}.tmp{os.getpid()}"
    with open(scratch, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(scratch, path)


def flash_blocks(default):
    """The flash kernel's ``BlockSizes``: the table's for this device when it has one, else ``default``."""
    from effjax.kernels.flash_attention import BlockSizes

    entry = tuned("triton", "attention")
    return default if entry is None else BlockSizes(**{name: int(entry[name]) for name in FLASH_FIELDS})


def time_call(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up (compilation) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def tune_flash(shapes, candidates, *, repeats: int, dtype, interpret=None) -> tuple[dict, dict]:
    """``(best BlockSizes fields, {candidate: total seconds})`` of the flash kernel's forward + backward."""
    from effjax.kernels.flash_attention import BlockSizes, flash_attention

    totals = {}
    for blocks in candidates:
        sizes = BlockSizes(*blocks)
        total = 0.0
        for batch, length, heads, head_dim in shapes:
            keys = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys)

            def loss(q, k, v, sizes=sizes):
                out = flash_attention(q, k, v, causal=True, blocks=sizes, interpret=interpret)
                return jnp.sum(out.astype(jnp.float32))

            total += time_call(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, k, v, repeats=repeats)
        totals[blocks] = total
    best = min(totals, key=totals.get)
    return dict(zip(FLASH_FIELDS, best, strict=True)), {",".join(map(str, b)): t for b, t in totals.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure the flash kernel's block sizes and write block_table.json")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--head_dims", default="64,128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table", default=None, help=f"default {TABLE_PATH}")
    parser.add_argument("--small", action="store_true", help="tiny interpreted run on a CPU (times mean nothing)")
    args = parser.parse_args(argv)
    if args.small:
        shapes, dtype, interpret = [(1, 32, 1, 16)], jnp.float32, True
        candidates = [(16, 16, 16, 16), (32, 16, 16, 32)]
        args.repeats = 1
    else:
        shapes = [(args.batch, int(length), args.heads, int(d)) for length in args.lengths.split(",")
                  for d in args.head_dims.split(",")]
        dtype, interpret = jnp.bfloat16, None
        candidates = [c for c in itertools.product((64, 128), (32, 64, 128), (32, 64), (64, 128))]
    best, totals = tune_flash(shapes, candidates, repeats=args.repeats, dtype=dtype, interpret=interpret)
    kind = device_kind()
    entry = {**best, "shapes": [list(s) for s in shapes], "seconds": totals, "date": time.strftime("%Y-%m-%d")}
    write(entry, "triton", "attention", kind, args.table)
    print(f"{kind}: flash blocks {best} (fastest of {len(candidates)}) -> {args.table or TABLE_PATH}")


if __name__ == "__main__":
    main()
