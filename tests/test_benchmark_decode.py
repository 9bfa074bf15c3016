"""benchmarks/decode.py runs end to end at toy sizes and writes its rows, table and plot (no timing is asserted)."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

RECURRENT = ("retnet", "gla", "linear_elu", "mamba2", "hgrn2")  # a cache that does not grow with the context


@pytest.mark.slow  # two processes compiling two LMs: 18 s of the default tier's budget
def test_decode_benchmark_writes_rows_table_and_plot(tmp_path):
    from effjax import attention

    decoding = attention.supporting("decode")
    other = next((m for m in RECURRENT if m in decoding), None)
    methods = ["softmax"] + ([other] if other else [])
    out = tmp_path / "decode"
    args = [sys.executable, "benchmarks/decode.py", f"--methods={','.join(methods)}", "--contexts=64,128",
            "--batches=1", "--steps=3", "--layers=1", "--embed=32", "--heads=2", "--mlp=32", "--vocab=32",
            f"--out={out}"]
    proc = subprocess.run(args, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(f"{out}.jsonl")]
    by = {(r["method"], r["context"]): r for r in rows}
    assert set(by) == {(m, c) for m in methods for c in (64, 128)}, rows
    for row in rows:
        assert row["status"] == "ok" and row["prefill_status"] == "ok" and row["decode_from"] == "prefill", row
        assert row["batch"] == 1 and row["steps"] == 3 and row["prefill_tokens"] == row["context"] - 4
        assert row["tokens_per_s"] > 0 and row["prefill_seconds"] > 0 and row["step_memory_bytes"] > 0
    # softmax's key/value cache grows with the context; a recurrent state does not.
    assert by[("softmax", 128)]["cache_bytes_per_seq"] > 1.9 * by[("softmax", 64)]["cache_bytes_per_seq"]
    if other:
        assert by[(other, 128)]["cache_bytes_per_seq"] == by[(other, 64)]["cache_bytes_per_seq"]
    table = (tmp_path / "decode.md").read_text()
    assert "| `softmax` | 1.00 ; 1.00 ; 1.00 | 1.00 ; 1.00 ; 1.00 |" in table
    assert all(f"`{m}`" in table for m in methods)
    assert (tmp_path / "decode.png").stat().st_size > 10_000

    # Resumable: a second run with one more context keeps the cells already there and measures only the new one
    # (and softmax again as that run's baseline, which it is here anyway).
    proc = subprocess.run([*args[:3], "--contexts=64", *args[4:]], cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(open(f"{out}.jsonl").read().splitlines()) == len(rows)
