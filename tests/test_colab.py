"""The notebooks in colabs/: stored clean, and each runs end to end on one CPU device in a fresh kernel."""

import json
import os
import re
import sys

import nbformat
import numpy as np
import pytest
from helpers import ROOT

NOTEBOOKS = ("train_listops.ipynb", "attention_zoo.ipynb", "decoding.ipynb")
STEPS = 8


def _read(name):
    return nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)


def _text_outputs(nb):
    """All stream and text/plain output of the executed code cells, concatenated."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def _pin_kernel_to_this_python(jupyter_dir, monkeypatch):
    """Makes kernel name 'python3' start this interpreter (the one that has effjax's dependencies).

    JUPYTER_PATH is searched before the environment's and the user's kernel folders, so a 'python3' spec
    elsewhere (say, a user-wide one pointing at another Python) cannot win.
    """
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (effjax tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_and_valid(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, f"stored with outputs:\n{cell.source[:200]}"


def _execute(nb, tmp_path, monkeypatch):
    """Runs every cell of ``nb`` in a fresh kernel of this Python, on one CPU device, from the repo root."""
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    _pin_kernel_to_this_python(tmp_path / "jupyter", monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    return _text_outputs(nb)


def _has_image(nb):
    return any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_listops_notebook_trains_on_cpu(tmp_path, monkeypatch):
    plot = tmp_path / "loss.png"
    monkeypatch.setenv("EFFJAX_COLAB_STEPS", str(STEPS))
    monkeypatch.setenv("EFFJAX_COLAB_PLOT", str(plot))
    nb = _read("train_listops.ipynb")
    text = _execute(nb, tmp_path, monkeypatch)
    assert "accuracy" in text
    match = re.search(r"^losses: \[(.*)\]$", text, re.MULTILINE)
    assert match, f"no 'losses: [...]' line in the output:\n{text[-3000:]}"
    losses = np.array([float(x) for x in match.group(1).split(",")])
    assert losses.shape == (STEPS,)
    assert np.all(np.isfinite(losses)), losses
    assert plot.is_file() and plot.stat().st_size > 0
    assert _has_image(nb)


@pytest.mark.slow
def test_attention_zoo_notebook_compares_methods_and_plots_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFJAX_ZOO_METHODS", "sliding_window,performer,linear_elu")
    monkeypatch.setenv("EFFJAX_ZOO_COST_METHODS", "softmax,linear_elu")
    monkeypatch.setenv("EFFJAX_ZOO_LENGTHS", "64,128")
    nb = _read("attention_zoo.ipynb")
    text = _execute(nb, tmp_path, monkeypatch)
    for name in ("sliding_window", "performer", "linear_elu"):
        assert re.search(rf"^{name} +\d+\.\d+ +-?\d\.\d+$", text, re.MULTILINE), text[-3000:]
    match = re.search(r"performer error by features: \{(.*)\}", text)
    errors = [float(pair.split(":")[1]) for pair in match.group(1).split(",")]
    assert errors[-1] < errors[0], errors  # more random features, closer to softmax
    assert "| `softmax` | 1.00 / 1.00 | 1.00 / 1.00 |" in text
    assert re.search(r"linear_elu +time grows as length\^", text)
    assert _has_image(nb)


@pytest.mark.slow
def test_decoding_notebook_generates_and_compares_cache_sizes(tmp_path, monkeypatch):
    lengths = (64, 256)
    monkeypatch.setenv("EFFJAX_DECODING_STEPS", str(STEPS))
    monkeypatch.setenv("EFFJAX_DECODING_METHODS", "softmax,mamba2")
    monkeypatch.setenv("EFFJAX_DECODING_LENGTHS", ",".join(map(str, lengths)))
    nb = _read("decoding.ipynb")
    text = _execute(nb, tmp_path, monkeypatch)
    assert re.search(r"^final loss: \d+\.\d+", text, re.MULTILINE), text[-3000:]
    assert "greedy equals forward passes: True" in text, text[-3000:]
    assert "prefill + steps by hand equal them: True" in text, text[-3000:]
    assert "prefill_chunk=4:" in text and "next token after the continued cache:" in text, text[-3000:]
    table = {}  # method -> {context: cache bytes per sequence}
    for method, context, per_seq, _ in re.findall(r"^(\w+) +(\d+) +([\d,]+) +(\d+)$", text, re.MULTILINE):
        table.setdefault(method, {})[int(context)] = int(per_seq.replace(",", ""))
    assert set(table) == {"softmax", "mamba2"} and all(set(row) == set(lengths) for row in table.values()), table
    softmax, mamba2 = ([row[n] for n in lengths] for row in (table["softmax"], table["mamba2"]))
    assert softmax[1] == softmax[0] * lengths[1] // lengths[0], softmax  # a key/value cache grows with the context
    assert mamba2[0] == mamba2[1] < softmax[0], mamba2  # a recurrent state does not
    assert _has_image(nb)
