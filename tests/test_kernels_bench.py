"""benchmarks/kernel_speed.py --small runs end to end on CPU (kernels interpreted) and writes its table, rows
and plot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_small_writes_jsonl_md_and_png(tmp_path):
    base = str(tmp_path / "kernels_cpu")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_speed.py"), "--small", "--lengths=64",
           "--head_dims=16", "--repeats=1", f"--out={base}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for ext in ("jsonl", "md", "png"):
        assert os.path.getsize(f"{base}.{ext}") > 0, ext
    rows = [json.loads(line) for line in open(f"{base}.jsonl")]
    status = {(r["impl"], r["pass"]): r["status"] for r in rows}
    for impl in ("flash", "xla", "pallas_mha", "block_sparse_10", "block_sparse_25"):
        for p in ("fwd", "fwd+bwd"):
            assert status[(impl, p)] == "ok", (impl, p, status[(impl, p)])
    for backend in ("cudnn", "mosaic_gpu", "tokamax"):  # each dispatch backend skipped with its supports reason
        assert status[(backend, "fwd")].startswith("refused: "), (backend, status[(backend, "fwd")])
    assert status[("cudnn", "fwd")] == "refused: float32 (cuDNN takes bf16/fp16)"  # --small runs float32
    flash = next(r for r in rows if r["impl"] == "flash" and r["pass"] == "fwd")
    assert flash["tflops"] > 0 and flash["x_xla"] > 0
    if os.path.exists(os.path.join(ROOT, "kernels", "linear_attention.py")):
        assert status[("linear_chunked", "fwd+bwd")] == "ok", status[("linear_chunked", "fwd+bwd")]
    assert "| `flash` | 16 | 64 | no | fwd |" in open(f"{base}.md").read()
    auto = json.load(open(f"{base}_auto_table.json"))["cpu"]  # the interpreted times order nothing real
    assert auto["attention"][0]["min_length"] == 64 and auto["attention"][0]["order"][-1] == "xla"
