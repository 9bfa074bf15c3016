"""Shared test utilities: running the command-line entry point and reading checkpoints."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _pytest.mark.structures import ParameterSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/lra_listops.py:smoke"


def slow_after(cases, keep=1, *, unpack=True):
    """Parametrize ``cases`` with all but the first ``keep`` marked slow: the default tier checks the property at
    ``keep`` shapes, the slow tier at all of them. Cases may be plain values, tuples of several arguments, or
    ``pytest.param``s; ``unpack=False`` for one argument whose values are tuples."""
    def slow(case):
        if isinstance(case, ParameterSet):
            return pytest.param(*case.values, marks=(*case.marks, pytest.mark.slow), id=case.id)
        return pytest.param(*(case if unpack and isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)

    return [case if i < keep else slow(case) for i, case in enumerate(cases)]


def tiered(names, default_tier):
    """``names`` as parameters, those outside ``default_tier`` marked slow: a per-method check runs for a few
    representatives in the default tier and for every method in the slow tier."""
    return [name if name in default_tier else pytest.param(name, marks=pytest.mark.slow) for name in names]


def smoke_config(**overrides):
    """The ListOps ``:smoke`` config with dotted-key overrides, e.g. ``smoke_config(**{"model.embed_dim": 64})``."""
    from configs import lra_listops

    config = lra_listops.get_config("smoke")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def main_command(workdir, *overrides, config=SMOKE):
    return [sys.executable, "-m", "effjax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def subprocess_env(devices=1, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_main(workdir, *overrides, devices=1, timeout=300, check=True):
    proc = subprocess.run(main_command(workdir, *overrides), cwd=ROOT, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"effjax.main failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def load_params(workdir, step, item="params"):
    """The params (or another TrainState field) of a checkpoint as numpy arrays, whatever mesh or process
    count wrote it."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          checkpointer.metadata(path).item_metadata)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target)[item])


def files_snapshot(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
