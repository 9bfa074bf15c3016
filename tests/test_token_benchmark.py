"""benchmarks/token_reduction.py runs end to end in its tiny mode and writes every row it promises (no timing is
asserted): the default tier with two methods on an untrained model, the slow tier with every method on a model it
trains first."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from effjax import tokens


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module("token_reduction")
    finally:
        sys.path.pop(0)


@pytest.mark.slow  # every method on a briefly trained model; the default tier tests the table update below
@pytest.mark.parametrize("methods,train_steps", [("", 2)])
def test_tiny_token_benchmark_writes_every_row_with_finite_ratios(tmp_path, methods, train_steps):
    out = tmp_path / "tokens"
    command = [sys.executable, "benchmarks/token_reduction.py", "--tiny", f"--workdir={tmp_path / 'shapes'}",
               f"--train_steps={train_steps}", f"--out={out}"] + ([f"--methods={methods}"] if methods else [])
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(f"{out}.json"))
    bench = _bench()
    names = methods.split(",") if methods else tokens.names()
    assert results["methods"] == names
    for section in ("speed", "agreement"):
        rows = results[section]
        layers = results["shapes"]["num_layers"]
        expected = {("none", "-")} | {(m, label) for m in names for label, _ in bench.rates(m, layers, tiny=True)}
        found = {(r["method"], r["schedule"]) for r in rows}
        assert found == expected and len(found) == len(rows), (section, found ^ expected)  # refused ones too
        assert all(r["status"] == "ok" or r["status"].startswith("refused: ") for r in rows)
        assert {"none", "tome", "topk"} <= {r["method"] for r in rows if r["status"] == "ok"}, section
        base = [r for r in rows if r["method"] == "none"]
        assert len(base) == 1 and base[0]["speed_ratio"] == base[0]["gflops_ratio"] == 1.0
        for r in rows:
            if r["status"] == "ok":
                for key in ("gflops_ratio", "speed_ratio", "images_per_s", "gflops"):
                    assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key, r[key])
                assert r["final_tokens"] <= base[0]["final_tokens"]
    agreement = {r["method"]: r for r in results["agreement"] if r["status"] == "ok"}
    assert agreement["none"]["agreement"] == 1.0 and agreement["none"]["accuracy_drop"] == 0.0
    for r in agreement.values():
        assert 0.0 <= r["agreement"] <= 1.0 and math.isfinite(r["accuracy_drop"])
    assert results["shapes"]["step"] == train_steps and results["shapes"]["images"] == 16
    assert "### Agreement: Shapes ViT" in proc.stdout and "| `tome` | r=8 |" in proc.stdout
    assert (tmp_path / "tokens.png").stat().st_size > 10_000


def test_update_replaces_the_rerun_methods_rows_and_keeps_the_others_in_order():
    def rows(section, methods, ratio):
        return [dict(section=section, model="m", batch=8, method=m, schedule=s, status="ok", speed_ratio=ratio)
                for m in methods for s in ("a", "b")]

    before = ["none", "tome", "topk", "lat"]
    old = {"date": "d0", "methods": before[1:], "speed": rows("speed", before, 1.0),
           "agreement": rows("agreement", before, 1.0)}
    new = {"date": "d1", "methods": ["lat", "new"], "speed": rows("speed", ["none", "lat", "new"], 2.0),
           "agreement": []}
    merged = _bench().updated(old, new)
    assert [(r["method"], r["schedule"], r["speed_ratio"]) for r in merged["speed"]] == [
        ("none", "a", 1.0), ("none", "b", 1.0), ("tome", "a", 1.0), ("tome", "b", 1.0), ("topk", "a", 1.0),
        ("topk", "b", 1.0), ("lat", "a", 2.0), ("lat", "b", 2.0), ("new", "a", 2.0), ("new", "b", 2.0)]
    assert merged["agreement"] == old["agreement"]  # a section the rerun skipped stays as it was
    assert merged["methods"] == ["tome", "topk", "lat", "new"] and merged["reruns"] == [
        {"date": "d1", "methods": ["lat", "new"]}]
