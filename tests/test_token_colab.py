"""colabs/token_reduction.ipynb: stored clean, and it runs end to end on one CPU device in a fresh kernel at small
sizes (a 2-layer Shapes ViT trained a few steps, the tiny benchmark with two methods)."""

import re

import pytest
from test_colab import _execute, _has_image, _read

NAME = "token_reduction.ipynb"


def test_token_notebook_is_stored_clean_and_valid():
    nb = _read(NAME)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, f"stored with outputs:\n{cell.source[:200]}"


@pytest.mark.slow
def test_token_notebook_draws_merges_and_pruning_and_the_trade_off(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFJAX_TOKENS_WORKDIR", str(tmp_path / "shapes"))  # no checkpoint: trains one
    monkeypatch.setenv("EFFJAX_TOKENS_TRAIN_STEPS", "4")
    monkeypatch.setenv("EFFJAX_TOKENS_TINY", "1")
    monkeypatch.setenv("EFFJAX_TOKENS_RESULTS", str(tmp_path / "absent.json"))  # runs the tiny benchmark
    monkeypatch.setenv("EFFJAX_TOKENS_METHODS", "tome,topk")
    monkeypatch.setenv("EFFJAX_TOKENS_IMAGES", "0,1")
    nb = _read(NAME)
    text = _execute(nb, tmp_path, monkeypatch)
    assert re.search(r"_colab: step 4, 2 layers", text), text[-3000:]
    # 65 tokens; ToMe r=4 and r=8 on 2 layers leave 57 and 49, Top-K keep 0.7 and 0.5 at layer 1 leave 45 and 33.
    for line in ("tome r=4: 65 -> 57 tokens", "tome r=8: 65 -> 49 tokens", "topk keep=0.7@1: 65 -> 45 tokens",
                 "topk keep=0.5@1: 65 -> 33 tokens"):
        assert line in text, text[-3000:]
    assert "running the tiny benchmark" in text
    assert "| `none` | - | 65 | 1.000 |" in text and "| `tome` | r=8 | 49 |" in text
    assert _has_image(nb)
