"""End-to-end trainer behaviour: outputs, exact resume after kill -9 and SIGTERM, NaN stop, bad input."""

import functools
import json
import os
import signal
import subprocess
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
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

from effjax.train import checkpoint, steps, trainer, warm_start

# A run long enough to be interrupted part-way: 60 steps, a checkpoint every 5, a metrics row every step.
LONG = ("--config.total_steps=60", "--config.checkpoint_every=5", "--config.eval_every=0",
        "--config.keep_checkpoints=3")


def test_smoke_run_writes_metrics_events_config_checkpoints_and_finite_metrics(tmp_path):
    """Six steps cannot learn ListOps (nor beat its majority class): this checks the outputs, not learning."""
    result = trainer.train_and_evaluate(smoke_config(), str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert {"train/accuracy", "steps_per_sec", "train/learning_rate"} <= set(train_rows[0])
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert np.isfinite(result["eval/loss"]) and 0.0 < result["eval/majority_class_rate"] <= 1.0
    assert result["eval/accuracy"] * 16 == round(result["eval/accuracy"] * 16), "a share of the 16 examples"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
    assert json.load(open(tmp_path / "config.json"))["model"]["num_layers"] == 2
    assert checkpoint_steps(tmp_path) == [3, 6]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_main(workdir, *LONG)
    return load_params(workdir, 60)


def start(workdir):
    return subprocess.Popen(main_command(workdir, *LONG, "--config.log_every=1"), cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, proc, timeout=240):
    """Blocks until metrics.jsonl has a row at ``step`` or later."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                seen = [json.loads(line)["step"] for line in f if line.strip()]
            if seen and max(seen) >= step:
                return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise TimeoutError(f"no metrics row for step {step}")


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_kill_9_then_rerun_reaches_identical_parameters(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoint_steps(tmp_path)
    assert saved and max(saved) < 60, f"the kill should land mid-run, checkpoints: {saved}"
    result = run_main(tmp_path, *LONG)
    assert "Finished 60 steps" in result.stdout
    assert_same_params(load_params(tmp_path, 60), uninterrupted)
    steps_logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps_logged == sorted(steps_logged), "rows of the repeated steps must replace the old ones"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes_identically(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 7, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Stopped by SIGTERM at step" in out
    stopped_at = int(out.split("Stopped by SIGTERM at step ")[1].split()[0])
    assert stopped_at in checkpoint_steps(tmp_path) and stopped_at < 60
    run_main(tmp_path, *LONG)
    assert_same_params(load_params(tmp_path, 60), uninterrupted)


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = steps.train_step

    def poisoned(state, batch, **kw):
        new_state, metrics = original(state, batch, **kw)
        metrics["loss"] = jnp.where(state.step >= 4, jnp.nan, metrics["loss"])
        return new_state, metrics

    monkeypatch.setattr(steps, "train_step", poisoned)
    config = smoke_config(total_steps=12, checkpoint_every=3, log_every=10, eval_every=0)
    with pytest.raises(trainer.NonFiniteLossError, match="at step 5.*last good checkpoint is step 3"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [3]


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_and_nothing_is_touched(tmp_path):
    trainer.train_and_evaluate(smoke_config(total_steps=3, eval_every=0), str(tmp_path))
    before = files_snapshot(tmp_path)
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match="different config: model.embed_dim 32 -> 64.*new --workdir"):
        trainer.train_and_evaluate(smoke_config(total_steps=6, **{"model.embed_dim": 64}), str(tmp_path))
    assert files_snapshot(tmp_path) == before


@pytest.mark.parametrize("overrides, message", [
    ({"data.name": "listopz"}, "Unknown data source 'listopz'"),
    ({"model.attention": "performr"}, "Unknown attention method 'performr'"),
    ({"model.max_length": 32}, "config.data.max_length=64 exceeds config.model.max_length=32"),
    ({"batch_size": 7}, "batch_size=7 is not divisible"),
    ({"schedule": "linear"}, "config.schedule 'linear' is unknown"),
])
def test_bad_config_fails_before_touching_the_workdir(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(smoke_config(**overrides), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_misspelled_override_names_the_closest_key(tmp_path):
    proc = run_main(tmp_path, "--config.totl_steps=5", check=False)
    assert proc.returncode != 0
    assert 'Did you mean "total_steps"' in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_main(tmp_path, "--config.model.num_layer=5", check=False)
    assert proc.returncode != 0 and 'Did you mean "num_layers"' in proc.stderr
    assert not os.listdir(tmp_path)


def test_command_line_reports_bad_input_without_a_traceback(tmp_path):
    proc = run_main(tmp_path / "w", "--config.data.name=listopz", check=False)
    assert proc.returncode != 0
    assert "effjax: ValueError: Unknown data source 'listopz'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_per_layer_attention_and_method_params_from_the_command_line(tmp_path):
    proc = run_main(tmp_path, "--config.model.attention=softmax,linformer", "--config.total_steps=2",
                    "--config.eval_every=0", "--config.model.attention_params.linformer.k=8")
    assert "Finished 2 steps" in proc.stdout
    model = json.load(open(tmp_path / "config.json"))["model"]
    assert model["attention"] == "softmax,linformer" and model["attention_params"]["linformer"]["k"] == 8
    params = load_params(tmp_path, checkpoint_steps(tmp_path)[-1])
    assert params["trunk"]["block_1"]["attention"]["Attention_0"]["e_proj"].shape[-1] == 8


@pytest.mark.slow  # a trainer compile; the default tier's twin: test_optim's keep_frozen and trainable tests
def test_frozen_params_survive_training_with_weight_decay(tmp_path):
    config = smoke_config(total_steps=3, eval_every=0, weight_decay=0.5, learning_rate=0.1,
                          **{"model.attention": "performer", "model.attention_params": {"num_features": 16}})
    run = trainer.Run(config)
    state = run.init_state()
    before = jax.device_get(state.params)
    batches = run.train_iterator()
    for _ in range(3):
        state, _ = run.step(state, next(batches))
    after = jax.device_get(state.params)
    block = "trunk", "block_0", "attention"
    get = lambda p, *keys: functools.reduce(lambda d, k: d[k], keys, p)  # noqa: E731
    np.testing.assert_array_equal(get(after, *block, "Attention_0", "frozen_projection"),
                                  get(before, *block, "Attention_0", "frozen_projection"))
    assert not np.allclose(get(after, *block, "query"), get(before, *block, "query"))


@pytest.mark.slow
def test_model_state_of_prepbn_and_distil_resumes_exactly(tmp_path):
    overrides = {"model.norm": "prepbn", "model.distil": True, "model.num_layers": 2, "model.prepbn_steps": 4,
                 "checkpoint_every": 3, "eval_every": 0}
    trainer.train_and_evaluate(smoke_config(total_steps=6, **overrides), str(tmp_path / "straight"))
    trainer.train_and_evaluate(smoke_config(total_steps=3, **overrides), str(tmp_path / "resumed"))
    trainer.train_and_evaluate(smoke_config(total_steps=6, **overrides), str(tmp_path / "resumed"))
    for item in ("params", "model_state"):
        straight, resumed = (load_params(tmp_path / run, 6, item) for run in ("straight", "resumed"))
        jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    state = load_params(tmp_path / "straight", 6, "model_state")
    assert int(state["norm_progress"]["trunk"]["prepbn_schedule"]["step"]) == 6
    assert "distil_0" in state["batch_stats"]["trunk"]


@pytest.mark.slow  # two trainer compiles; the default tier's twin: test_merge_params_copies_matching_paths_only
def test_init_from_starts_a_new_run_from_the_matching_params_of_an_earlier_one(tmp_path, capsys):
    """A fine-tune of a 3-layer model from a 2-layer run: blocks 0-1 and the embeddings come over, block_2 is
    new (a changed shape is refused: test_merge_params_copies_matching_paths_only_and_refuses_another_shape)."""
    first = trainer.Run(smoke_config())  # its initial state saved as a checkpoint, as a run would (no training)
    saver = checkpoint.Saver(checkpoint.make_manager(str(tmp_path / "first"), 1), None)
    saver.save(first.init_state(), first.train_iterator(), first.config)
    saver.finish()
    saved = load_params(tmp_path / "first", 0)
    run = trainer.Run(smoke_config(**{"init_from": str(tmp_path / "first"), "model.num_layers": 3}))
    state = warm_start.warm_start(run.init_state(), str(tmp_path / "first"))
    note = capsys.readouterr().out
    assert "Initialised" in note and "new: trunk/block_2/" in note
    flat = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    fresh = flax.traverse_util.flatten_dict(jax.device_get(run.init_state().params), sep="/")
    for key, value in flax.traverse_util.flatten_dict(saved, sep="/").items():
        np.testing.assert_array_equal(flat[key], value)
    assert any("block_2" in key for key in flat) and all(
        np.array_equal(flat[key], fresh[key]) for key in flat if "block_2" in key)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        warm_start.checkpoint_dir(str(tmp_path))


def test_merge_params_copies_matching_paths_only_and_refuses_another_shape():
    params = {"block_0": {"kernel": jnp.zeros((2, 3))}, "new": {"bias": jnp.zeros(4)}}
    saved = {"block_0/kernel": np.ones((2, 3)), "old_head/kernel": np.ones(5)}
    merged, loaded, fresh, unused = warm_start.merge_params(params, saved)
    np.testing.assert_array_equal(merged["block_0"]["kernel"], 1.0)
    np.testing.assert_array_equal(merged["new"]["bias"], 0.0)
    assert (loaded, fresh, unused) == (["block_0/kernel"], ["new/bias"], ["old_head/kernel"])
    with pytest.raises(ValueError, match=r"param block_0/kernel has shape \[3, 2\] there but \[2, 3\]"):
        warm_start.merge_params(params, {"block_0/kernel": np.ones((3, 2))})
    with pytest.raises(ValueError, match="none of its 1 params is in this model"):
        warm_start.merge_params(params, {"other": np.ones(2)})
