"""What a chunked prefill saves: the prefill of one long prompt in one call against C tokens at a time.

  python benchmarks/chunked_prefill.py                          # prompts of 4K and 16K, chunks 512 and 2048
  python benchmarks/chunked_prefill.py --lengths=1024 --chunks=256 --methods=softmax

For each method, prompt length P and chunk C (0: one call), the decoder LM of ``benchmarks/decode_model.py``
(2 layers, embed 128, 4 heads, float32, a cache of P slots) prefills a batch of one prompt exactly as
``effjax.generate(prefill_chunk=C)`` does (``effjax.inference.generate._prefill``), jitted with the cache donated.
A row gives XLA's planned peak memory of that call (arguments, outputs and temporaries) and its best time of
``--repeats``. One call holds the P x P attention logits of a layer at once (softmax's XLA path); C at a time holds
C x (P + C). Recurrent methods hold a state either way, so for them the chunk size changes little.

Writes ``benchmarks/results/chunked_prefill.{jsonl,md}`` (``--out``).
"""

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import decode_model  # noqa: E402
from benchmarks import efficiency_common as shared  # noqa: E402

_METHODS = flags.DEFINE_list("methods", ["softmax", "sliding_window", "gated_deltanet"], "Methods (extend).")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384"], "Prompt lengths.")
_CHUNKS = flags.DEFINE_list("chunks", ["0", "512", "2048"], "Chunk sizes (0: the whole prompt in one call).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per cell (the best is kept), after one warm-up.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 12.0, "Skip a call whose planned memory exceeds this.")
_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "chunked_prefill"), "Path and basename of outputs.")


def measure(method: str, length: int, chunk: int, repeats: int, max_bytes: float) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from effjax.inference.generate import _prefill

    row = {"method": method, "length": length, "chunk": chunk}
    model, variables = decode_model.decoder_lm_for(method, length)
    tokens = jax.random.randint(jax.random.key(1), (1, length), 1, 256, jnp.int32)
    lengths = jnp.full((1,), length, jnp.int32)
    empty = jax.jit(lambda: nn.meta.unbox(model.init_cache(1, length)))
    start = jnp.zeros((1,), jnp.int32)  # from the empty cache
    prefill = jax.jit(lambda v, t, n, c: _prefill(model, v, t, n, start, c, chunk), donate_argnums=(3,))
    compiled = prefill.lower(variables, tokens, lengths, jax.eval_shape(empty)).compile()
    row["memory_bytes"] = shared.planned_bytes(compiled)
    if row["memory_bytes"] > max_bytes:
        return {**row, "status": "skipped: memory"}
    jax.block_until_ready(compiled(variables, tokens, lengths, empty()))

    def run():
        jax.block_until_ready(compiled(variables, tokens, lengths, empty()))

    row["seconds"] = shared.best_seconds(run, repeats)  # includes making the empty cache (same for every chunk)
    return {**row, "status": "ok"}


def markdown(rows: list[dict], stamp: dict) -> str:
    lines = [f"Prefill of one prompt, {stamp['date']}, {stamp['device']}: planned peak memory and best time, in "
             "one call (chunk 0) and C tokens at a time (`effjax.generate(prefill_chunk=C)`); ratios to the one "
             "call of the same method and length.", "",
             "| method | prompt | chunk | planned MiB | vs one call | seconds | vs one call |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["method"], r["length"]): r for r in rows if r["chunk"] == 0 and r["status"] == "ok"}
    for r in rows:
        one = base.get((r["method"], r["length"]))
        mib = r["memory_bytes"] / 2**20
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {shared.length_label(r['length'])} | {r['chunk']} | {mib:.0f} | | "
                         f"{r['status']} | |")
            continue
        ratio_m = f"{r['memory_bytes'] / one['memory_bytes']:.2f}x" if one else ""
        ratio_t = f"{r['seconds'] / one['seconds']:.2f}x" if one else ""
        lines.append(f"| {r['method']} | {shared.length_label(r['length'])} | {r['chunk']} | {mib:.0f} | {ratio_m} | "
                     f"{r['seconds']:.3f} | {ratio_t} |")
    return "\n".join(lines) + "\n"


def describe(row: dict) -> str:
    return (f"{row['method']:16s} P={row['length']:6d} chunk {row['chunk']:5d}: "
            f"{row['memory_bytes'] / 2**20:9.1f} MiB planned, {row.get('seconds', float('nan')):8.3f} s "
            f"({row['status']})")


def main(argv):
    del argv
    cells = [(method, int(length), int(chunk), _REPEATS.value, _MEMORY_GB.value * 2**30)
             for method in _METHODS.value for length in _LENGTHS.value for chunk in _CHUNKS.value]
    shared.measure_cells(cells, measure, describe, markdown, _OUT.value)


if __name__ == "__main__":
    app.run(main)
