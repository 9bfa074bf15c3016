"""colabs/architecture_search.ipynb: stored clean, and it runs end to end on one CPU device in a fresh kernel at
small sizes (programs printed and mutated, two programs trained a few steps, a tiny program search and NAS)."""

import re

import pytest
from test_colab import _execute, _has_image, _read

NAME = "architecture_search.ipynb"


def test_search_notebook_is_stored_clean_and_valid():
    code = [cell for cell in _read(NAME).cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, f"stored with outputs:\n{cell.source[:200]}"


@pytest.mark.slow
def test_search_notebook_prints_mutates_trains_searches_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFJAX_SEARCH_TRAIN_STEPS", "3")
    monkeypatch.setenv("EFFJAX_SEARCH_CANDIDATES", "2")
    monkeypatch.setenv("EFFJAX_SEARCH_STEPS", "3")
    monkeypatch.setenv("EFFJAX_SEARCH_WORKDIR", str(tmp_path / "work"))
    nb = _read(NAME)
    text = _execute(nb, tmp_path, monkeypatch)
    assert "def s2(h0, h1):" in text and "JSON round trip exact: True" in text
    assert re.search(r"mutation: \S+", text) and "changed lines:" in text
    assert re.search(r"Transformer: \d\.\d{3} bits/byte after 3 steps", text), text[-3000:]
    assert "2 candidates; best" in text and re.search(r"2 candidates, \d+ on the Pareto front", text)
    assert _has_image(nb)
