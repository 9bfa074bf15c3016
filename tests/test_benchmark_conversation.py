"""benchmarks/conversation.py runs end to end at toy sizes and writes its rows and table (no timing is asserted);
the script itself checks that the continued turn's tokens equal the whole text's."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env


@pytest.mark.slow  # one process compiling half a dozen generations: about 17 s
def test_conversation_benchmark_writes_rows_and_table(tmp_path):
    out = tmp_path / "conversation"
    args = [sys.executable, "benchmarks/conversation.py", "--methods=gated_deltanet", "--histories=96",
            "--prompt=8", "--new_tokens=4", "--step_tokens=8", "--repeats=1", f"--out={out}"]
    proc = subprocess.run(args, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(f"{out}.jsonl")]
    assert [(r["method"], r["history"]) for r in rows] == [("gated_deltanet", 96)], rows
    for row in rows:
        assert row["scratch_seconds"] > 0 and row["continued_seconds"] > 0 and row["step_tokens"] == 8, row
    table = (tmp_path / "conversation.md").read_text()
    assert "| gated_deltanet | 96 | 8 + 4 |" in table, table
