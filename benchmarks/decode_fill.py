"""What a softmax decoding step costs against how full its key/value cache is: read by blocks up to the furthest
filled slot (``decoding.kv_attend``, blocks of ``decoding.KV_BLOCK``) or in one masked pass over every slot.

  python benchmarks/decode_fill.py                                   # caches of 16K and 64K, batch 1 and 16
  python benchmarks/decode_fill.py --contexts=4096 --batches=1 --fills=64,2048

``generate`` makes the cache for the model's ``max_length`` whatever the prompt, so a short prompt in a long-context
model decodes with a mostly empty cache. For each cache length C, batch B and fill F (the position of the first
timed step), the decoder LM of ``benchmarks/decode_model.py`` (softmax, 2 layers, embed 128, 4 heads, float32) takes one
warm-up step and ``--steps`` timed steps from position F, jitted once per setting with the cache donated;
tokens/s = B / the median step time. A step's cost depends on the cache's shapes and the positions, not the
values in the slots, so the steps run from the empty cache. Both settings run side by side in one process.

Writes ``benchmarks/results/decode_fill.{jsonl,md}`` (``--out``).
"""

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import decode_model  # noqa: E402
from benchmarks import efficiency_common as shared  # noqa: E402
from effjax.files import write_atomic  # noqa: E402

_CONTEXTS = flags.DEFINE_list("contexts", ["16384", "65536"], "Cache lengths (slots).")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_FILLS = flags.DEFINE_list("fills", ["64", "quarter", "full"], "Positions of the first timed step: a number, "
                           "'quarter' (C / 4) or 'full' (C - steps - 1).")
_STEPS = flags.DEFINE_integer("steps", 32, "Timed decode steps per cell (after one warm-up step).")
_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "decode_fill"), "Path and basename of the outputs.")


def fill_position(fill: str, context: int, steps: int) -> int:
    return {"quarter": context // 4, "full": context - steps - 1}.get(fill) or int(fill)


def measure(model, variables, context: int, batch: int, start: int, steps: int, one_pass: bool) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from effjax.attention import decoding

    default = decoding.KV_BLOCK
    decoding.KV_BLOCK = context if one_pass else default  # read when the step is traced
    try:
        step = jax.jit(decode_model.greedy_step(model), donate_argnums=(2,))
        cache = jax.jit(lambda: nn.meta.unbox(model.init_cache(batch, context)))()
        token, position = jnp.ones((batch,), jnp.int32), jnp.full((batch,), start, jnp.int32)
        token, cache, position = jax.block_until_ready(step(variables, token, cache, position))
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            token, cache, position = jax.block_until_ready(step(variables, token, cache, position))
            times.append(time.perf_counter() - begin)
    finally:
        decoding.KV_BLOCK = default
    return batch / float(np.median(times))


def main(argv):
    del argv
    from effjax.attention import decoding

    contexts, batches = [int(c) for c in _CONTEXTS.value], [int(b) for b in _BATCHES.value]
    model, variables = decode_model.decoder_lm_for("softmax", max(contexts))
    stamp = {"date": shared.today(), "device": shared.device_description(), "kv_block": decoding.KV_BLOCK}
    rows = []
    print(f"device: {stamp['device']}; blocks of {decoding.KV_BLOCK} slots")
    for context in contexts:
        for batch in batches:
            for fill in _FILLS.value:
                start = fill_position(fill, context, _STEPS.value)
                speeds = {name: measure(model, variables, context, batch, start, _STEPS.value, name == "one_pass")
                          for name in ("blocks", "one_pass")}
                rows.append({"context": context, "batch": batch, "position": start, **speeds})
                print(f"C={context:6d} B={batch:3d} position {start:6d}: blocks {speeds['blocks']:9.1f} tok/s, "
                      f"one pass {speeds['one_pass']:9.1f} tok/s, {speeds['blocks'] / speeds['one_pass']:.2f}x",
                      flush=True)
    shared.write_jsonl(_OUT.value + ".jsonl", rows, stamp)
    lines = [f"Softmax decoding step, {stamp['date']}, {stamp['device']}: tokens/s reading the cache by blocks of "
             f"{decoding.KV_BLOCK} slots up to the furthest filled one, against one masked pass over every slot.", "",
             "| cache slots | batch | position | blocks tok/s | one pass tok/s | blocks / one pass |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['batch']} | {r['position']} | {r['blocks']:.0f} | {r['one_pass']:.0f} | "
              f"{r['blocks'] / r['one_pass']:.2f} |" for r in rows]
    write_atomic(_OUT.value + ".md", "\n".join(lines) + "\n")
    print(f"\nwrote {_OUT.value}.jsonl and .md")


if __name__ == "__main__":
    app.run(main)
