"""Two local JAX processes (jax.distributed over localhost, gloo CPU collectives) train in step."""

import os
import subprocess

import jax
import numpy as np
import portpicker
import pytest
from helpers import ROOT, load_params, main_command, run_main, subprocess_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
OVERRIDES = ("--config.total_steps=6", "--config.checkpoint_every=3", "--config.eval_every=3")


def test_two_processes_match_each_other_and_a_single_process(tmp_path):
    port = portpicker.pick_unused_port()
    workdir = tmp_path / "two"
    procs = [
        subprocess.Popen(
            main_command(workdir, *OVERRIDES, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                         f"--process_id={i}", "--cpu_devices=2"),
            cwd=ROOT, env=subprocess_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
        assert p.returncode == 0, err[-4000:]
        outs.append(out.strip().splitlines()[-1])
    assert outs[0] == outs[1] and outs[0].startswith("Finished 6 steps")  # same global eval on both
    assert sorted(os.listdir(workdir / "checkpoints" / "6" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    single = tmp_path / "one"
    one = run_main(single, *OVERRIDES, "--cpu_devices=4", devices=4)
    assert one.stdout.strip().splitlines()[-1] == outs[0]
    assert_close(load_params(workdir, 6), load_params(single, 6))

    # The two-process checkpoint resumes in one process (another topology) exactly like the 1-process run.
    longer = ("--config.total_steps=9", "--cpu_devices=4")
    resumed = run_main(workdir, *OVERRIDES, *longer, devices=4)
    assert "Resuming from the checkpoint at step 6" in resumed.stdout
    run_main(single, *OVERRIDES, *longer, devices=4)
    assert_close(load_params(workdir, 9), load_params(single, 9))


def assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
