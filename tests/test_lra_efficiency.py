"""The LRA efficiency benchmark (Table 2 layout) runs end to end at a toy size and writes what it promises."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

sys.path.insert(0, ROOT)
from benchmarks import lra_efficiency_tables as lra_efficiency  # noqa: E402


@pytest.mark.slow
def test_lra_efficiency_script_writes_rows_tables_and_plot(tmp_path):
    out = tmp_path / "lra"
    proc = subprocess.run([sys.executable, "benchmarks/lra_efficiency.py", "--methods=softmax,linear_elu",
                           "--lengths=128", "--batch=2", "--steps=1", "--repeats=1", f"--out={out}",
                           "--config=configs/lra_text.py:size=smoke"], cwd=ROOT,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(f"{out}.jsonl")]
    assert {(r["method"], r["impl"], r["length"], r["status"]) for r in rows} == {
        ("softmax", "xla", 128, "ok"), ("linear_elu", "xla", 128, "ok")}
    assert all(r["steps_per_sec"] > 0 and r["memory_bytes"] > 0 and r["memory_source"] == "memory_analysis"
               and r["batch"] == 2 and r["device"] for r in rows)
    table = open(f"{out}.md").read()
    assert table.count("| `softmax` |") == 2 and table.count("(1.00x) |") >= 2 and "`linear_elu`" in table
    assert (tmp_path / "lra.png").stat().st_size > 10_000


def test_tables_give_softmax_ratio_one_and_show_skips_and_refusals():
    rows = [dict(method="softmax", impl="xla", length=1024, status="ok", steps_per_sec=8.0, memory_bytes=2**30),
            dict(method="performer", impl="xla", length=1024, status="ok", steps_per_sec=12.0,
                 memory_bytes=2**29),
            dict(method="softmax", impl="xla", length=2048, status="skipped: planned 40.0 GB"),
            dict(method="performer", impl="xla", length=2048, status="ok", steps_per_sec=10.0, memory_bytes=2**30),
            dict(method="reformer", impl="xla", length=1024, status="refused: reformer: no mask")]
    table = lra_efficiency.tables(rows, [1024, 2048], ["xla"])
    assert "| `softmax` | 8.00 (1.00x) | skipped: planned 40.0 GB |" in table
    assert "| `performer` | 12.00 (1.50x) | 10.00 |" in table  # no ratio without a softmax row that ran
    assert "| `performer` | 0.50 (0.50x) | 1.00 |" in table
    assert "| `reformer` | refused | - |" in table


def test_pallas_runs_only_methods_with_a_kernel_path_and_softmax_comes_first():
    pairs = lra_efficiency.plan(["reformer", "performer"], ["xla", "pallas"])
    assert pairs == [("softmax", "xla"), ("softmax", "pallas"), ("reformer", "xla"), ("performer", "xla"),
                     ("performer", "pallas")]
