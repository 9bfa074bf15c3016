"""colabs/train_listops.ipynb: stored clean, and runs end to end on one CPU device in a fresh kernel."""

import json
import os
import re
import sys

import nbformat
import numpy as np
import pytest
from helpers import ROOT

NOTEBOOK = os.path.join(ROOT, "colabs", "train_listops.ipynb")
STEPS = 8


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


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


def test_notebook_is_stored_clean_and_valid():
    nb = _read()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, f"stored with outputs:\n{cell.source[:200]}"


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    plot = tmp_path / "loss.png"
    monkeypatch.setenv("EFFJAX_COLAB_STEPS", str(STEPS))
    monkeypatch.setenv("EFFJAX_COLAB_PLOT", str(plot))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    _pin_kernel_to_this_python(tmp_path / "jupyter", monkeypatch)

    nb = _read()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    text = _text_outputs(nb)
    assert "accuracy" in text
    match = re.search(r"^losses: \[(.*)\]$", text, re.MULTILINE)
    assert match, f"no 'losses: [...]' line in the output:\n{text[-3000:]}"
    losses = np.array([float(x) for x in match.group(1).split(",")])
    assert losses.shape == (STEPS,)
    assert np.all(np.isfinite(losses)), losses
    assert plot.is_file() and plot.stat().st_size > 0
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
