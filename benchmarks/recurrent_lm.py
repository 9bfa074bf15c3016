"""The linear-attention / state-space families and two hybrids side by side on the byte-level LM.

  python benchmarks/recurrent_lm.py                      # every family + 2 hybrids + softmax, size=cpu (300 steps)
  python benchmarks/recurrent_lm.py --entries=softmax,gated_deltanet --size=smoke

Each entry trains ``configs/lm_recurrent.py`` (``lm_bytes``' task, model and optimizer; every layer the entry's
method, a hybrid with softmax in every fourth layer) for the same number of steps on the same data and seed,
one after another in this process, and records the final validation loss in bits per byte and the wall time.
Entries already in the results file are skipped, so an interrupted run continues where it stopped
(``--fresh`` starts over). Wall times are comparable only inside one run on one machine.

Writes ``benchmarks/results/recurrent_lm.{jsonl,md}`` (``--out``).
"""

import json
import math
import os
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from effjax.files import write_atomic  # noqa: E402

FAMILIES = ("retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "rwkv7", "hgrn2")
HYBRIDS = {"gated_deltanet+softmax": ("gated_deltanet", 4), "mamba2+softmax": ("mamba2", 4)}
DEFAULT_ENTRIES = ("softmax", *FAMILIES, *HYBRIDS)

_ENTRIES = flags.DEFINE_list("entries", list(DEFAULT_ENTRIES),
                             f"Methods, or hybrids ({', '.join(HYBRIDS)}); softmax is the Transformer baseline.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "full", "smoke"], "lm_recurrent's size.")
_FRESH = flags.DEFINE_bool("fresh", False, "Ignore (and overwrite) earlier rows of the results file.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "recurrent_lm"),
                           "Path and basename of the .jsonl and .md written.")


def config_arg(entry: str, size: str) -> str:
    """``configs/lm_recurrent.py``'s arg for ``entry`` (a method name or a key of ``HYBRIDS``)."""
    method, every = HYBRIDS.get(entry, (entry, 0))
    return f"method={method},attention_every={every},size={size}"


def run_entry(entry: str, size: str) -> dict:
    import jax

    from configs import lm_recurrent
    from effjax.train import trainer

    config = lm_recurrent.get_config(config_arg(entry, size))
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        result = trainer.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
    methods = [config.model.full_attention if i in config.model.full_attention_layers else config.model.attention
               for i in range(config.model.num_layers)]
    return {"entry": entry, "size": size, "layers": "/".join(methods), "steps": int(result["step"]),
            "bits_per_byte": float(result["eval/loss"]) / math.log(2), "seconds": round(seconds, 1),
            "device": jax.devices()[0].device_kind,
            "date": time.strftime("%Y-%m-%d")}


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["entry"] == "softmax"), None)
    lines = ["| entry | layers | steps | validation bits/byte | wall time (s) | time / softmax |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        lines.append(f"| `{row['entry']}` | {row['layers']} | {row['steps']} | {row['bits_per_byte']:.3f} | "
                     f"{row['seconds']:.0f} | {ratio} |")
    head = rows[0] if rows else {"device": "?", "date": "?", "size": "?"}
    return (f"Byte-level LM, `configs/lm_recurrent.py` size={head['size']}, {head['device']}, {head['date']}; "
            "one run, entries one after another.\n\n" + "\n".join(lines) + "\n")


def main(_):
    path = _OUT.value + ".jsonl"
    rows = []
    if os.path.exists(path) and not _FRESH.value:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {(r["entry"], r["size"]) for r in rows}
    for entry in _ENTRIES.value:
        if (entry, _SIZE.value) in done:
            print(f"{entry}: already in {path}, skipped")
            continue
        row = run_entry(entry, _SIZE.value)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    table = markdown([r for r in rows if r["size"] == _SIZE.value])
    write_atomic(_OUT.value + ".md", table)
    print(table)


if __name__ == "__main__":
    app.run(main)
