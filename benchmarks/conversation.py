"""What continuing a context saves, and what keeping one costs (``effjax.generate(keep_context=True, context=)``).

  python benchmarks/conversation.py                          # histories of 2K and 8K tokens
  python benchmarks/conversation.py --histories=512 --methods=softmax --new_tokens=8

For each method and history length H, the decoder LM of ``benchmarks/decode_model.py`` (2 layers, embed 128,
4 heads, float32; a cache of H + prompt + step tokens) answers the second turn of two conversations (batch 2): a new
prompt of ``--prompt`` tokens after H tokens of conversation, then ``--new_tokens`` greedy tokens. Two ways, best
of ``--repeats`` after a warm-up call of the same shapes:
- ``from scratch``: ``generate`` on the whole texts (H + prompt tokens) from the empty cache;
- ``continued``: ``generate(prompts, context=...)`` from the context the first turn kept (a copy per call, made
  before the clock starts), which prefills only the pending token and the new prompt; the script checks that both
  give the same tokens.
Then what keeping a context costs where a row stops early: the second turn continued for ``--step_tokens`` tokens
with a stop token that only conversation 0 draws (its earliest such token, step ``stop_step`` in the rows), so
conversation 1 runs every step while 0 waits from there, with
``keep_context=True`` (each step selects the stopped row's old cache: a pass over the cache) against the same call
with ``keep_context=False``.

Writes ``benchmarks/results/conversation.{jsonl,md}`` (``--out``).
"""

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import decode_model  # noqa: E402
from benchmarks import efficiency_common as shared  # noqa: E402

_METHODS = flags.DEFINE_list("methods", ["softmax", "sliding_window", "gated_deltanet"], "Methods (extend).")
_HISTORIES = flags.DEFINE_list("histories", ["2048", "8192"], "Tokens of conversation before the new prompt.")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Tokens of the new prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per turn.")
_STEP_TOKENS = flags.DEFINE_integer("step_tokens", 256, "Tokens generated to time the decoding steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (the best is kept), after a warm-up.")
BATCH = 2  # two conversations: one stops early while the other runs on

_OUT = flags.DEFINE_string("out", os.path.join(shared.RESULTS, "conversation"), "Path and basename of outputs.")


def measure(method: str, history: int, prompt: int, new_tokens: int, step_tokens: int, repeats: int) -> dict:
    import numpy as np

    import effjax

    cache_length = history + prompt + max(new_tokens, step_tokens)
    model, variables = decode_model.decoder_lm_for(method, cache_length)
    params = variables["params"]
    rng = np.random.default_rng(0)
    first = [list(rng.integers(1, 256, history - 1)) for _ in range(BATCH)]  # + one generated token = history
    second = [list(rng.integers(1, 256, prompt)) for _ in range(BATCH)]
    kept = effjax.generate(model, params, first, max_new_tokens=1, cache_length=cache_length, keep_context=True)
    whole = [f + [int(t)] + s for f, t, s in zip(first, kept.tokens[:, 0], second, strict=True)]

    def timed(call, fresh_context=False):
        """Best seconds of ``call`` (given a fresh copy of the kept context when ``fresh_context``)."""
        contexts = [kept.context.copy() for _ in range(repeats + 1)] if fresh_context else [None] * (repeats + 1)
        call(contexts.pop())  # warm-up: compiles
        return shared.best_seconds(lambda: call(contexts.pop()), repeats)

    def continued(n, **options):
        return lambda context: effjax.generate(model, params, second, max_new_tokens=n, context=context, **options)

    scratch = lambda _: effjax.generate(model, params, whole, max_new_tokens=new_tokens, cache_length=cache_length)
    row = {"method": method, "history": history, "prompt": prompt, "new_tokens": new_tokens, "batch": BATCH,
           "scratch_seconds": timed(scratch), "continued_seconds": timed(continued(new_tokens), fresh_context=True)}
    np.testing.assert_array_equal(scratch(None).tokens, continued(new_tokens)(kept.context.copy()).tokens)

    # Row 0 stops at its first token that row 1 never draws, row 1 runs on: every later step of a kept context
    # selects row 0's old cache.
    free = continued(step_tokens)(kept.context.copy()).tokens
    only_row_0 = [step for step, t in enumerate(free[0].tolist()) if t not in set(free[1].tolist())]
    if not only_row_0:
        raise RuntimeError("Conversation 1 draws every token conversation 0 does: no stop token stops only one; "
                           "try another --history or --step_tokens.")
    stop = [int(free[0, only_row_0[0]])]
    row["stop_step"] = only_row_0[0]
    for keep in (False, True):
        row[f"steps_{'kept_' if keep else ''}seconds"] = timed(
            continued(step_tokens, stop_tokens=stop, keep_context=keep), fresh_context=True)
    row["step_tokens"] = step_tokens
    return row


def markdown(rows: list[dict], stamp: dict) -> str:
    lines = [f"A second turn of two conversations, {stamp['date']}, {stamp['device']}: a new prompt after H tokens, "
             "generated from the whole texts (from scratch) or continuing the first turn's context; then the "
             "turn continued for more steps with one conversation stopped early, keeping the context (a select "
             "over the cache per step) or not (best of repeats).", "",
             "| method | history | prompt + new | from scratch s | continued s | continued / scratch | steps | "
             "not kept s | kept s | kept / not |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {shared.length_label(r['history'])} | {r['prompt']} + {r['new_tokens']} | "
                     f"{r['scratch_seconds']:.3f} | {r['continued_seconds']:.3f} | "
                     f"{r['continued_seconds'] / r['scratch_seconds']:.2g}x | {r['step_tokens'] - 1} | "
                     f"{r['steps_seconds']:.3f} | {r['steps_kept_seconds']:.3f} | "
                     f"{r['steps_kept_seconds'] / r['steps_seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def describe(row: dict) -> str:
    return (f"{row['method']:16s} H={row['history']:6d}: scratch {row['scratch_seconds']:.3f} s, continued "
            f"{row['continued_seconds']:.3f} s; steps {row['steps_seconds']:.3f} s, with a kept context "
            f"{row['steps_kept_seconds']:.3f} s")


def main(argv):
    del argv
    cells = [(method, int(history), _PROMPT.value, _NEW_TOKENS.value, _STEP_TOKENS.value, _REPEATS.value)
             for method in _METHODS.value for history in _HISTORIES.value]
    shared.measure_cells(cells, measure, describe, markdown, _OUT.value)


if __name__ == "__main__":
    app.run(main)
