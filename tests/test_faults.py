"""Run faults (Foundation review item 7): each is refused or recovered with one line, and nothing on disk is lost.

The default tier checks each property in-process (the check functions, real orbax on a toy state, and a
few tiny trainer runs); the slow tier drives the command line in subprocesses.
"""

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import (
    ROOT,
    checkpoint_steps,
    files_snapshot,
    load_params,
    main_command,
    run_main,
    smoke_config,
    subprocess_env,
)
from ml_collections import ConfigDict

from effjax.train import checkpoint, metrics, trainer
from effjax.train import workdir as workdir_lib
from effjax.train.state import TrainState


def tiny_config(**overrides):
    """The smoke config cut to 2 steps, a checkpoint every step and no evaluation until the end (validation only)."""
    return smoke_config(**{"total_steps": 2, "checkpoint_every": 1, "eval_every": 0, "eval_max_batches": 1,
                            "test_at_end": False, **overrides})


# --- 4: the workdir is a file or not writable --------------------------------------------------------------

def test_workdir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir={path} is a file"):
        trainer.train_and_evaluate(tiny_config(), str(path))
    with pytest.raises(workdir_lib.WorkdirError, match="lies under a file"):
        workdir_lib.check_writable(str(path / "sub"))
    assert path.read_text() == "mine"


def test_workdir_without_write_permission_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root every directory is writable
    with pytest.raises(workdir_lib.WorkdirError, match="is not writable by this user"):
        workdir_lib.check_writable(str(tmp_path))
    with pytest.raises(workdir_lib.WorkdirError, match=f"cannot be created: its parent {tmp_path} is not writable"):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []


# --- 8: two runs on one workdir ------------------------------------------------------------------------------

def test_second_holder_of_the_workdir_lock_is_refused_with_pid_and_host(tmp_path):
    with workdir_lib.exclusive(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()} on host"):
            with workdir_lib.exclusive(str(tmp_path)):
                pass
    assert not os.path.exists(tmp_path / workdir_lib.LOCK_NAME), "the lock file goes when the run ends"
    (tmp_path / workdir_lib.LOCK_NAME).write_text('{"pid": 1, "host": "crashed"}')  # left by a kill -9
    with workdir_lib.exclusive(str(tmp_path)):
        assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())["pid"] == os.getpid()


# --- 6: resuming with another config -------------------------------------------------------------------------

def test_config_differences_ignore_only_the_resumable_fields():
    saved = checkpoint.plain_config(tiny_config())
    current = checkpoint.plain_config(tiny_config(**{
        "total_steps": 9, "eval_every": 3, "checkpoint_every": 2, "keep_checkpoints": 5, "log_every": 2,
        "eval_max_batches": 0, "mesh.data": 1, "data.cache_dir": "/elsewhere"}))
    assert checkpoint.config_differences(saved, current) == []
    changed = checkpoint.plain_config(tiny_config(**{
        "model.attention": "linear_elu", "data.max_depth": 3, "learning_rate": 0.5, "seed": 1}))
    assert [d.split()[0] for d in checkpoint.config_differences(saved, changed)] == [
        "data.max_depth", "learning_rate", "model.attention", "seed"]
    assert all(f in saved or f.split(".")[0] in saved for f in checkpoint.RESUMABLE_FIELDS)


# --- 11: the user's own files in the workdir -----------------------------------------------------------------

def test_unparseable_metrics_file_is_named_and_nothing_is_written(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\nnot json\n')
    (tmp_path / "config.json").write_text("my own notes")
    before = files_snapshot(tmp_path)
    with pytest.raises(workdir_lib.WorkdirError, match=f"{tmp_path / 'metrics.jsonl'} line 2 is not a metrics row"):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert files_snapshot(tmp_path) == before


def test_metrics_rows_past_the_resume_step_are_moved_aside_not_deleted(tmp_path, capsys):
    rows = [{"step": s, "train/loss": 1.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics.keep_rows_through(str(tmp_path), 1, metrics.read_rows(str(tmp_path)))
    assert [r["step"] for r in metrics.read_rows(str(tmp_path))] == [1]
    assert len(open(tmp_path / "metrics.jsonl.old").readlines()) == 3
    assert "had 2 row(s) after step 1" in capsys.readouterr().out
    metrics.keep_rows_through(str(tmp_path), 0, metrics.read_rows(str(tmp_path)))  # no checkpoint: all rows go
    assert os.path.exists(tmp_path / "metrics.jsonl.old-2") and not metrics.read_rows(str(tmp_path))


def test_a_different_config_json_is_moved_aside(tmp_path, capsys):
    (tmp_path / "config.json").write_text("my own notes")
    metrics.write_config(str(tmp_path), tiny_config())
    assert (tmp_path / "config.json.old").read_text() == "my own notes"
    assert json.load(open(tmp_path / "config.json"))["total_steps"] == 2
    metrics.write_config(str(tmp_path), tiny_config())  # the same config: nothing moved
    assert sorted(os.listdir(tmp_path)) == ["config.json", "config.json.old"]
    assert capsys.readouterr().out.count("config.json differs") == 1


# --- 5: a failed (e.g. disk-full) save ----------------------------------------------------------------------

class _FailingManager:
    """Stands in for an orbax manager whose background save ran out of space."""

    directory = "/tmp"

    def save(self, step, args):
        pass

    def is_saving_in_progress(self):
        return False

    def wait_until_finished(self):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ... No space left on device [os_error_code='28']")

    def close(self):
        raise AssertionError("a failed manager is not waited on again")


def test_a_failed_background_save_stops_with_path_free_space_and_last_good_step():
    saver = checkpoint.Saver(_FailingManager(), last_good=3)
    with pytest.raises(checkpoint.CheckpointSaveError) as caught:
        saver._pending = 6
        saver.poll()
    message = str(caught.value)
    assert "\n" not in message
    assert "Saving checkpoint 6 to /tmp failed (RESOURCE_EXHAUSTED" in message
    assert "MiB free there" in message and "the last good checkpoint is step 3" in message
    saver.close()  # does not raise again


@pytest.mark.slow
def test_disk_full_during_a_save_stops_the_run_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from grain._src.python.checkpoint.handler import CheckpointHandler  # writes the iterator state of each save

    original, calls = CheckpointHandler.save, []

    def full_at_the_second_save(self, directory, item=None, args=None):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return original(self, directory, item, args)

    monkeypatch.setattr(CheckpointHandler, "save", full_at_the_second_save)
    with pytest.raises(checkpoint.CheckpointSaveError, match="Saving checkpoint 2 .*No space left on device.*"
                       "MiB free there.*last good checkpoint is step 1"):
        trainer.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path))
    assert checkpoint_steps(tmp_path) == [1]
    assert max(r["step"] for r in metrics.read_rows(str(tmp_path))) == 2, "the run stopped at the failed save"


def _half_then_disk_full(real_open):
    """An ``open`` whose files write half of what they are given, then fail as a full disk does."""
    class HalfFile:
        def __init__(self, *args):
            self.f = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    return HalfFile


def test_a_failed_metrics_write_leaves_no_half_row_and_names_the_file_and_free_space(tmp_path, monkeypatch):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, {"train/loss": 2.0})
    before = [(tmp_path / "metrics.jsonl").read_bytes(), open(writer.events_path, "rb").read()]
    monkeypatch.setattr(metrics, "open", _half_then_disk_full(open), raising=False)
    with pytest.raises(metrics.MetricsWriteError) as caught:
        writer.write(2, {"train/loss": 1.0})
    assert str(caught.value) == (f"Writing {tmp_path / 'metrics.jsonl'} failed (No space left on device); "
                                 f"{workdir_lib.free_space(str(tmp_path))} there.")
    monkeypatch.undo()
    assert [(tmp_path / "metrics.jsonl").read_bytes(), open(writer.events_path, "rb").read()] == before
    assert metrics.read_rows(str(tmp_path)) == [{"step": 1, "train/loss": 2.0}]


@pytest.mark.slow
def test_disk_full_during_a_metrics_write_stops_the_run_with_one_line_and_the_last_good_step(tmp_path, monkeypatch):
    original, calls = metrics.MetricWriter.write, []

    def full_at_the_second_row(self, step, scalars):
        calls.append(step)
        if len(calls) == 2:
            monkeypatch.setattr(metrics, "open", _half_then_disk_full(open), raising=False)
        return original(self, step, scalars)

    monkeypatch.setattr(metrics.MetricWriter, "write", full_at_the_second_row)
    with pytest.raises(metrics.MetricsWriteError, match=r"metrics.jsonl failed .*MiB free there. The run stopped; "
                       r"the last good checkpoint is step 1\. Free some space"):
        trainer.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path))
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path) == [1]
    assert max(r["step"] for r in metrics.read_rows(str(tmp_path))) == 1


# --- 7: a damaged newest checkpoint --------------------------------------------------------------------------

def _toy_state(step):
    return TrainState(step=jnp.array(step, jnp.int32), params={"w": jnp.full((4,), float(step))}, model_state={},
                      opt_state={}, rng=jnp.zeros((2,), jnp.uint32))


def _toy_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _toy_checkpoints(directory, steps=(1, 2, 3)):
    config = ConfigDict({"model": {"name": "toy"}, "data": {"name": "toy"}, "total_steps": 3})
    manager = checkpoint.make_manager(directory, keep=5)
    saver = checkpoint.Saver(manager, None)
    iterator = _toy_iterator()
    for step in steps:
        next(iterator)
        saver.save(_toy_state(step), iterator, config)
    saver.close()
    return config


def _restore_toy(directory, config):
    manager = checkpoint.make_manager(directory, keep=5)
    iterator = _toy_iterator()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _toy_state(0))
    try:
        step, state = checkpoint.restore_latest(manager, config, abstract, iterator)
        return step, state, next(iterator), manager.all_steps()
    finally:
        manager.close()


DAMAGE = {
    "truncated manifest": lambda d: open(os.path.join(d, "state", "manifest.ocdbt"), "r+b").truncate(10),
    "no manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "no meta": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
    "no iterator state": lambda d: [os.remove(p) for p in
                                    [os.path.join(d, "data", n) for n in os.listdir(os.path.join(d, "data"))]],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restores(tmp_path, capsys, damage):
    config = _toy_checkpoints(str(tmp_path))
    DAMAGE[damage](str(tmp_path / "checkpoints" / "3"))
    step, state, next_example, listed = _restore_toy(str(tmp_path), config)
    assert step == 2 and float(state.params["w"][0]) == 2.0 and next_example == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3.corrupt"] and listed == [1, 2]
    out = capsys.readouterr().out
    assert "Checkpoint 3 is damaged" in out and "moved it to" in out and "3.corrupt" in out


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
    config = _toy_checkpoints(str(tmp_path), steps=(1, 2))
    for step in (1, 2):
        DAMAGE["no meta"](str(tmp_path / "checkpoints" / str(step)))
    with pytest.raises(checkpoint.NoRestorableCheckpointError, match="No checkpoint .* restores \\(step 2: .*step 1"):
        _restore_toy(str(tmp_path), config)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


# --- 9: a diverged state is never saved as good ------------------------------------------------------------

class _RunGiving:
    """Stands in for trainer.Run: check_state returns the given (next loss, parameters finite)."""

    def __init__(self, next_loss, params_finite):
        self.result = next_loss, params_finite

    def check_state(self, state, data_iterator):
        return self.result


def test_a_state_is_saved_only_with_finite_parameters_and_a_finite_next_loss():
    trainer._check_saveable(_RunGiving(2.3, True), None, None, 4, 2)
    with pytest.raises(trainer.NonFiniteLossError, match="step 4 gives a loss of nan on the next batch, so it was not "
                       "saved.*the last good checkpoint is step 2"):
        trainer._check_saveable(_RunGiving(float("nan"), True), None, None, 4, 2)
    with pytest.raises(trainer.NonFiniteLossError, match="step 4 has non-finite parameters.*no checkpoint was saved"):
        trainer._check_saveable(_RunGiving(2.3, False), None, None, 4, None)


def test_the_state_check_sees_non_finite_parameters_and_returns_the_train_steps_loss():
    def train_step(state, batch):
        return state, {"loss": jnp.sum(batch) * state.params["w"][0]}

    check = jax.jit(functools.partial(trainer._loss_and_finite_params, train_step=train_step))
    loss, finite = check(_toy_state(2), jnp.ones(3))
    assert float(loss) == 6.0 and bool(finite)
    _, finite = check(_toy_state(2).replace(params={"w": jnp.array([1.0, jnp.inf])}), jnp.ones(3))
    assert not bool(finite)


@pytest.mark.slow
def test_diverged_state_with_finite_loss_is_not_saved(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match="state at step 1 gives a loss of nan on the next batch.*"
                       "no checkpoint was saved yet"):
        trainer.train_and_evaluate(tiny_config(learning_rate=1e6), str(tmp_path))
    assert checkpoint_steps(tmp_path) == []


# --- 6, 8, 11, 12, 13, 14 on one finished tiny run ------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir as a finished 2-step tiny run leaves it (checkpoints 1 and 2, a final eval row), built without
    training so that the default tier stays fast."""
    workdir = tmp_path_factory.mktemp("finished")
    config = tiny_config()
    run = trainer.Run(config)
    state, iterator = run.init_state(), run.train_iterator()
    saver = checkpoint.Saver(checkpoint.make_manager(str(workdir), config.keep_checkpoints), None)
    for step in (1, 2):
        next(iterator)
        saver.save(state.replace(step=jnp.array(step, jnp.int32)), iterator, config)
    saver.close()
    metrics.write_config(str(workdir), config)
    writer = metrics.MetricWriter(str(workdir))
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": 2.0})
    writer.write(2, {"eval/loss": 2.0, "eval/accuracy": 0.25})
    writer.close()
    return workdir


def copy_of(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "w")
    return tmp_path / "w"


def test_ctrl_c_and_sigterm_are_recorded_as_stop_requests_and_handlers_restored():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with trainer._Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested == "SIGINT" and preemption.reached(1, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested == "SIGINT", "the first signal names the stop"
    assert signal.getsignal(signal.SIGINT) is before
    assert trainer.summary_line({"preempted_at_step": 3, "signal": "SIGINT"}).startswith(
        "Stopped by Ctrl-C (SIGINT) at step 3 after saving a checkpoint")


def test_a_second_ctrl_c_exits_at_once_with_one_line(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with trainer._Preemption():
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == []
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
    assert capsys.readouterr().err == ("effjax: second Ctrl-C: exiting at once without saving; the checkpoints on "
                                       "disk are kept.\n")


@pytest.mark.slow
def test_ctrl_c_in_process_saves_and_the_rerun_resumes_to_finite_metrics(tmp_path, monkeypatch):
    """Two steps cannot beat the majority class; besides the resume this checks the metrics are finite."""
    original = trainer.Run.step

    def step_then_ctrl_c(self, state, batch):
        out = original(self, state, batch)
        if int(out[0].step) == 1 and not checkpoint_steps(tmp_path):
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer.Run, "step", step_then_ctrl_c)
    config = tiny_config(checkpoint_every=0)
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"preempted_at_step": 1, "signal": "SIGINT"}
    done = trainer.train_and_evaluate(config, str(tmp_path))
    assert done["step"] == 2 and checkpoint_steps(tmp_path) == [1, 2]
    assert all(np.isfinite(v) for v in done.values())


def test_rerunning_a_finished_run_says_so_and_writes_nothing(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    before = files_snapshot(workdir)
    for total_steps in (2, 1):
        result = trainer.train_and_evaluate(tiny_config(checkpoint_every=0, total_steps=total_steps), str(workdir))
        assert result == {"already_at_step": 2, "total_steps": total_steps}
        assert trainer.summary_line(result).startswith("Nothing to train: the workdir's checkpoint is at step 2")
    assert files_snapshot(workdir) == before
    eval_rows = [r["step"] for r in metrics.read_rows(str(workdir)) if "eval/loss" in r]
    assert eval_rows == [2]


@pytest.mark.parametrize("overrides, field", [
    ({"model.attention": "linear_elu"}, "model.attention 'softmax' -> 'linear_elu'"),
    ({"data.max_depth": 3}, "data.max_depth 4 -> 3"),
    ({"learning_rate": 0.5}, "learning_rate 0.001 -> 0.5"),
])
def test_resuming_with_another_model_data_or_optimizer_is_refused(finished, tmp_path, overrides, field):
    workdir = copy_of(finished, tmp_path)
    before = files_snapshot(workdir)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=f"different config: {field}.*new --workdir"):
        trainer.train_and_evaluate(tiny_config(checkpoint_every=0, total_steps=4, **overrides), str(workdir))
    assert files_snapshot(workdir) == before


def test_a_run_on_a_locked_workdir_is_refused(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    before = files_snapshot(workdir)
    with workdir_lib.exclusive(str(workdir)):
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()}"):
            trainer.train_and_evaluate(tiny_config(checkpoint_every=0, total_steps=4), str(workdir))
    assert files_snapshot(workdir) == before


def test_sigterm_during_start_up_stops_with_one_line(finished, tmp_path, monkeypatch):
    workdir = copy_of(finished, tmp_path)
    original = checkpoint.restore_latest

    def restore_then_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(checkpoint, "restore_latest", restore_then_sigterm)
    result = trainer.train_and_evaluate(tiny_config(checkpoint_every=0, total_steps=4), str(workdir))
    assert result == {"stopped_before_training": "SIGTERM", "step": 2}
    assert trainer.summary_line(result).startswith("Stopped by SIGTERM during start-up")
    assert checkpoint_steps(workdir) == [1, 2]


# --- 2: the command line -------------------------------------------------------------------------------------

def test_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run(main_command(tmp_path / "w", config="configs/nope.py:smoke"), cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("effjax: config file 'configs/nope.py' (from --config) does not exist; "
                                   "check the path.")
    assert not os.path.exists(tmp_path / "w")


# --- slow tier: the same faults through the command line -----------------------------------------------------

LONG = ("--config.total_steps=60", "--config.checkpoint_every=5", "--config.eval_every=0",
        "--config.keep_checkpoints=3", "--config.log_every=1")


def start(workdir, *overrides):
    return subprocess.Popen(main_command(workdir, *LONG, *overrides), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, proc, timeout=240):
    """Blocks until metrics.jsonl has a row at ``step`` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics.read_rows(str(workdir)) if os.path.exists(workdir / "metrics.jsonl") else []
        if rows and max(r["step"] for r in rows) >= step:
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise TimeoutError(f"no metrics row for step {step}")


def error_lines(stderr):
    """stderr without tqdm's progress bar."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "train:" not in line]


@pytest.mark.slow
def test_command_line_one_line_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_main(tmp_path / "file", check=False)
    assert error_lines(proc.stderr) == [f"effjax: WorkdirError: --workdir={tmp_path / 'file'} is a file, not a "
                                        "directory; pass a new or existing directory."]
    run_main(tmp_path / "w", "--config.total_steps=2", "--config.eval_every=0")
    proc = run_main(tmp_path / "w", "--config.model.attention=linear_elu", check=False)
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1
    assert "model.attention 'softmax' -> 'linear_elu'" in proc.stderr
    proc = run_main(tmp_path / "w", "--config.total_steps=2", "--config.eval_every=0")
    assert proc.stdout.strip().startswith("Nothing to train: the workdir's checkpoint is at step 2")


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused_with_the_holders_pid(tmp_path):
    first = start(tmp_path)
    try:
        wait_for_step(tmp_path, 2, first)
        proc = run_main(tmp_path, *LONG, check=False)
        assert proc.returncode == 1
        assert error_lines(proc.stderr) == [line for line in error_lines(proc.stderr) if "in use" in line]
        assert f"in use by another run (pid {first.pid} on host" in proc.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_without_a_traceback(tmp_path):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    stopped_at = int(out.split("Stopped by Ctrl-C (SIGINT) at step ")[1].split()[0])
    assert stopped_at in checkpoint_steps(tmp_path)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_end_to_end(tmp_path):
    run_main(tmp_path, "--config.total_steps=6", "--config.eval_every=0", "--config.checkpoint_every=3")
    os.truncate(tmp_path / "checkpoints" / "6" / "state" / "manifest.ocdbt", 5)
    os.remove(tmp_path / "checkpoints" / "6" / "meta" / "metadata")
    proc = run_main(tmp_path, "--config.total_steps=6", "--config.eval_every=0", "--config.checkpoint_every=3")
    assert "Checkpoint 6 is damaged" in proc.stdout and "6.corrupt" in proc.stdout
    assert "Resuming from the checkpoint at step 3" in proc.stdout and "Finished 6 steps" in proc.stdout
    assert checkpoint_steps(tmp_path) == [3, 6] and os.path.isdir(tmp_path / "checkpoints" / "6.corrupt")


def _mount_tmpfs(path, size):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?); the in-process disk-full test covers the logic")


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem_stops_then_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    run_main(reference, *LONG)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        proc = start(disk / "w")
        wait_for_step(disk / "w", 12, proc)
        with open(disk / "filler", "wb") as f:  # fill the disk
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, out + err[-2000:]
        # The disk may be found full by a checkpoint save or by a metrics/TensorBoard append: either way, one line.
        lines = error_lines(err)
        assert len(lines) == 1, lines
        assert re.fullmatch(rf"effjax: (CheckpointSaveError: Saving checkpoint \d+ to {re.escape(str(disk))}/w/"
                            rf"checkpoints|MetricsWriteError: Writing {re.escape(str(disk))}/w/\S+) failed \(.*\); "
                            r"[\d.]+ MiB free there\. The run stopped; the last good checkpoint is step \d+\. Free "
                            r"some space and run the same command to resume\.", lines[0]), lines
        stopped = max(r["step"] for r in metrics.read_rows(str(disk / "w")))
        assert stopped < 60, "the failed save must stop the run"
        os.remove(disk / "filler")
        run_main(disk / "w", *LONG)
        for x, y in zip(jax.tree.leaves(load_params(disk / "w", 60)), jax.tree.leaves(load_params(reference, 60)),
                        strict=True):
            np.testing.assert_array_equal(x, y)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
