"""config.test_at_end: the test split evaluated once at the last step (LRA reports the last checkpoint's test
accuracy), written as a 'test/' metrics row, and finished on a rerun when the run stopped before it."""

import json
import shutil

import numpy as np
import optax
import pytest
from helpers import load_params, smoke_config

from effjax import data as data_lib
from effjax import models
from effjax.train import checkpoint, trainer

STEPS = 3


def read_rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]


def rows_with(rows, prefix, step=STEPS):
    return [r for r in rows if r["step"] == step and any(k.startswith(prefix) for k in r)]


def independent_test_metrics(config, workdir, step):
    """Loss, accuracy and majority-class rate of the saved params over the whole test split, without the trainer."""
    params = load_params(workdir, step)
    data_params = {k: v for k, v in config.data.to_dict().items() if k != "name"}
    source = data_lib.make_source(config.data.name, "test", **data_params)
    examples = [source[i] for i in range(len(source))]
    inputs = np.stack([e["inputs"] for e in examples])
    labels = np.array([int(e["targets"]) for e in examples])
    model_fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    model = models.build(config.model.name, vocab_size=source.vocab_size, num_classes=source.num_classes,
                         **model_fields)
    logits = np.asarray(model.apply({"params": params}, inputs, deterministic=True))
    loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    return {"test/loss": loss, "test/accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "test/majority_class_rate": float(np.bincount(labels).max() / len(labels))}


def config_with_test(**overrides):
    return smoke_config(total_steps=STEPS, test_at_end=True, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("test_at_end")
    return workdir, trainer.train_and_evaluate(config_with_test(), str(workdir))


def test_the_last_step_writes_a_test_row_equal_to_an_independent_evaluation(finished):
    workdir, result = finished
    (row,) = rows_with(read_rows(workdir), "test/")
    assert len(rows_with(read_rows(workdir), "eval/")) == 1
    expected = independent_test_metrics(config_with_test(), workdir, STEPS)
    assert {k: v for k, v in row.items() if k != "step"}.keys() == expected.keys()
    assert row["test/accuracy"] == expected["test/accuracy"]  # a share of the same 16 examples
    assert row["test/majority_class_rate"] == expected["test/majority_class_rate"]
    np.testing.assert_allclose(row["test/loss"], expected["test/loss"], rtol=1e-5)
    assert {k: result[k] for k in expected} == {k: row[k] for k in expected}
    assert f"test accuracy {100 * row['test/accuracy']:.2f}%" in trainer.summary_line(result)


def test_a_rerun_finishes_a_missing_test_evaluation_without_repeating_validation(finished, tmp_path):
    original, result = finished
    workdir = tmp_path / "stopped"
    shutil.copytree(original, workdir)
    rows = read_rows(workdir)
    with open(workdir / "metrics.jsonl", "w") as f:  # as if the run was killed before its test evaluation
        f.writelines(json.dumps(r) + "\n" for r in rows if not any(k.startswith("test/") for k in r))
    rerun = trainer.train_and_evaluate(config_with_test(), str(workdir))
    assert "already_at_step" not in rerun and rerun["step"] == STEPS
    assert {k: v for k, v in rerun.items() if "/" in k} == {k: v for k, v in result.items() if "/" in k}
    after = read_rows(workdir)
    assert len(rows_with(after, "eval/")) == 1 and rows_with(after, "test/") == rows_with(rows, "test/")
    assert "already_at_step" in trainer.train_and_evaluate(config_with_test(), str(workdir))


def test_done_only_once_every_final_row_exists():
    with_test, without = (smoke_config(total_steps=STEPS, test_at_end=on) for on in (True, False))
    eval_row = {"step": STEPS, "eval/loss": 1.0, "eval/accuracy": 0.5}
    test_row = {"step": STEPS, "test/loss": 1.0, "test/accuracy": 0.5}
    assert trainer._already_done(without, STEPS, [eval_row])
    assert not trainer._already_done(with_test, STEPS, [eval_row])
    assert trainer._already_done(with_test, STEPS, [eval_row, test_row])
    assert not trainer._already_done(with_test, STEPS, [test_row])
    assert not trainer._already_done(with_test, STEPS - 1, [eval_row, test_row])
    assert trainer._already_done(with_test, STEPS + 1, [])


def test_turning_test_at_end_on_or_off_does_not_block_resuming():
    """It changes which splits are evaluated at the end, not what a step computes; checkpoints saved before the
    field existed resume too."""
    saved = checkpoint.plain_config(smoke_config(test_at_end=False))
    assert checkpoint.config_differences(saved, checkpoint.plain_config(smoke_config(test_at_end=True))) == []
    assert checkpoint.config_differences(saved, checkpoint.plain_config(smoke_config(seed=1))) == ["seed 0 -> 1"]
    old = {k: v for k, v in saved.items() if k != "test_at_end"}
    assert checkpoint.config_differences(old, saved) == []


def test_the_summary_line_reports_test_accuracy_or_loss():
    line = trainer.summary_line({"step": 3, "eval/loss": 2.0, "eval/accuracy": 0.25, "eval/majority_class_rate": 0.2,
                                 "test/loss": 2.1, "test/accuracy": 0.3125, "test/majority_class_rate": 0.1875})
    assert line.endswith("; test accuracy 31.25% (majority-class rate 18.75%).")
    line = trainer.summary_line({"step": 3, "eval/loss": 2.0, "eval/accuracy": 0.25, "test/loss": 2.5,
                                 "test/accuracy": 0.5})
    assert "test accuracy 50.00%, test loss 2.5000" in line
    assert "test" not in trainer.summary_line({"step": 3, "eval/loss": 2.0, "eval/accuracy": 0.25})
