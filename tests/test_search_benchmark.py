"""benchmarks/search_primer.py: its steps-to-target interpolation, and (slow) an end-to-end run at toy sizes
writing its table and plot."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from search_primer import steps_to_reach  # noqa: E402


def test_steps_to_reach_interpolates_between_evaluations():
    assert steps_to_reach([(50, 3.0), (100, 2.0)], 2.5) == 75.0 and steps_to_reach([(50, 3.0)], 2.0) is None


@pytest.mark.slow
def test_search_benchmark_script_writes_curves_and_a_summary(tmp_path):
    out = tmp_path / "primer"
    proc = subprocess.run([sys.executable, "benchmarks/search_primer.py", "--steps=4", "--seeds=1", "--eval_every=2",
                           "--models=vanilla,primer",
                           "--eval_batches=1", f"--out={out}"], cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(f"{out}.json"))
    assert [p[0] for p in report["runs"]["vanilla"][0]["points"]] == [2, 4]
    assert report["summary"]["primer"]["flops_per_step"] > report["summary"]["vanilla"]["flops_per_step"]
    assert "final bits/byte" in proc.stdout and (tmp_path / "primer.png").stat().st_size > 5_000
