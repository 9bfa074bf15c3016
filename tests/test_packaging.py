"""The wheel installs ``kernels/`` as ``effjax.kernels`` (a bare ``kernels`` would collide with the PyPI package
of that name), and the kernels package imports nothing of effjax outside itself."""

import ast
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_import_nothing_of_effjax_outside_the_kernels_package():
    offenders = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {m}" for m in modules
                          if m.split(".")[0] in ("effjax", "kernels") and not m.startswith("effjax.kernels")]
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_installs_effjax_kernels_and_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=600)
    (wheel,) = tmp_path.glob("effjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "effjax/kernels/flash_attention.py" in names
    assert not [n for n in names if n.startswith("kernels/")]

    # A fresh venv outside the repo, with this venv's dependencies visible through a .pth file, and the
    # wheel installed without them: imports resolve to the installed wheel, not to the source tree.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    pathlib.Path(site, "effjax_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    probe = ("import effjax.kernels, effjax.kernels.flash_attention as f, effjax.attention.softmax; "
             "print(effjax.kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300).stdout.strip()
    assert out.startswith(site) and out.endswith(os.path.join("effjax", "kernels", "__init__.py")), out
