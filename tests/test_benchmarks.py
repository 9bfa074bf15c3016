"""The benchmark scripts run end to end at toy sizes and write what they promise (no timing is asserted)."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env


@pytest.mark.slow
def test_attention_efficiency_script_writes_rows_table_and_plot(tmp_path):
    out = tmp_path / "eff"
    proc = subprocess.run([sys.executable, "benchmarks/attention_efficiency.py", "--methods=softmax,linear_elu,bigbird",
                           "--lengths=64,128", "--repeats=1", f"--out={out}"], cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(f"{out}.jsonl")]
    ok = {(r["method"], r["length"]) for r in rows if r["status"] == "ok"}
    assert {("softmax", 64), ("softmax", 128), ("linear_elu", 64), ("linear_elu", 128)} <= ok
    assert all(r["seconds"] > 0 and r["memory_bytes"] > 0 for r in rows if r["status"] == "ok")
    table = open(f"{out}.md").read()
    assert "| `softmax` | 1.00 / 1.00 | 1.00 / 1.00 |" in table and "`linear_elu`" in table
    assert (tmp_path / "eff.png").stat().st_size > 10_000
