"""The six LRA task configs: every protocol, size and stage validates; each task trains on fixture or generated
data; the pretraining stage hands its trunk to the fine-tune (Retrieval's two documents included)."""

import importlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_retrieval import PAIRS, write_tsv

from configs import lra_common
from effjax import models
from effjax.train import trainer, warm_start
from effjax.train.validate import validate

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def load(task, arg=None):
    return importlib.import_module(f"configs.lra_{task}").get_config(arg)


@pytest.mark.parametrize("task", TASKS)
def test_every_protocol_size_and_stage_is_a_valid_config(task):
    for protocol, size, stage in itertools.product(lra_common.PROTOCOLS, lra_common.SIZES, lra_common.STAGES):
        config = load(task, f"protocol={protocol},size={size},stage={stage}")
        validate(config, process_count=1, batch_shards=1)
        assert config.test_at_end == (stage == "finetune")
        assert config.model.name == ("encoder_pretrain" if stage == "pretrain" else
                                     "dual_encoder" if task == "retrieval" else "encoder_classifier")
        if protocol == "modern":
            assert (config.model.pooling, config.model.position) == ("mean", "rotary")
            assert config.schedule == ("constant" if size == "smoke" else "cosine")


def test_original_protocol_keeps_the_lra_repo_settings():
    listops, text, pathfinder = load("listops"), load("text"), load("pathfinder")
    assert (listops.model.num_layers, listops.model.embed_dim, listops.model.mlp_dim, listops.total_steps,
            listops.learning_rate, listops.schedule) == (4, 512, 1024, 5000, 0.05, "rsqrt")
    assert (text.model.max_length, text.warmup_steps, text.total_steps) == (1000, 8000, 20_000)
    assert (pathfinder.model.pooling, pathfinder.model.position, pathfinder.total_steps,
            pathfinder.data.contour_length) == ("mean", "sinusoid", 62_400, 14)
    assert load("pathx").data.resolution == 128 and load("pathx").model.max_length == 128 * 128


@pytest.mark.parametrize("arg, message", [("protocol=moden", "Unknown LRA config protocol='moden'; valid: "
                                                             "lra_original, modern"),
                                          ("size=tiny", "valid: full, cpu, smoke"),
                                          ("stage=pre", "valid: finetune, pretrain")])
def test_bad_protocol_size_or_stage_names_the_valid_ones(arg, message):
    with pytest.raises(ValueError, match=message):
        load("text", arg)


@pytest.fixture(scope="module")
def aan_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tsv_data")
    for split in ("train", "eval", "test"):
        write_tsv(directory / f"new_aan_pairs.{split}.tsv", PAIRS * 4)
    return directory


def smoke(task, aan_dir, stage="finetune"):
    """The task's smoke config cut to 2 steps, with the fixture TSV for Retrieval (the others generate theirs)."""
    config = load(task, f"size=smoke,stage={stage}")
    if task == "retrieval":
        config.data.data_dir = str(aan_dir)
    config.total_steps = config.eval_every = config.checkpoint_every = 2
    return config


# Text and Image under mock TFDS data: tests/test_configs.py::test_tfds_configs_run_end_to_end_on_mock_data;
# ListOps: every smoke test of the trainer. The default twins: every
# config validates above, and the sources build in tests/test_data_pathfinder.py.
@pytest.mark.slow
@pytest.mark.parametrize("task", ["pathfinder", "retrieval"])  # Path-X: Pathfinder's source at another resolution
def test_each_task_trains_two_steps_and_reports_test_accuracy(task, aan_dir, tmp_path):
    # Tiny fixture and generated data have nothing learnable in 2 steps: this checks that each task builds, trains
    # and evaluates both splits to finite numbers, not that it learns.
    result = trainer.train_and_evaluate(smoke(task, aan_dir), str(tmp_path))
    assert result["step"] == 2 and math.isfinite(result["eval/loss"]) and math.isfinite(result["test/loss"])
    assert 0.0 <= result["test/accuracy"] <= 1.0 and 0.0 < result["test/majority_class_rate"] <= 1.0


@pytest.mark.slow
def test_retrieval_pretraining_reads_each_document_as_a_row_and_hands_over_its_trunk(aan_dir, tmp_path):
    pretrain = smoke("retrieval", aan_dir, stage="pretrain")
    trainer.train_and_evaluate(pretrain, str(tmp_path / "pretrain"))
    saved, _ = warm_start.load_params(str(tmp_path / "pretrain"))
    assert saved["trunk/pos_embed"].shape[0] == pretrain.model.max_length + 1  # one document (+ CLS), not two
    finetune = smoke("retrieval", aan_dir)
    finetune.init_from = str(tmp_path / "pretrain")
    run = trainer.Run(finetune)
    state = warm_start.warm_start(run.init_state(), finetune.init_from)
    params = warm_start.flatten_dict(state.params, sep="/")
    fresh = warm_start.flatten_dict(run.init_state().params, sep="/")
    trunk = [key for key in params if key.startswith("trunk/")]
    assert trunk and all(np.array_equal(np.asarray(params[key]), saved[key]) for key in trunk)
    assert not any(key.startswith("head/") for key in saved)  # the two-tower head starts fresh
    head = [key for key in params if key.startswith("head/")]
    assert head and all(np.array_equal(np.asarray(params[key]), np.asarray(fresh[key])) for key in head)
    assert not np.array_equal(saved["trunk/token_embed/embedding"], np.asarray(fresh["trunk/token_embed/embedding"]))


def test_lra_classifier_head_is_dense_relu_dense_on_the_pooled_vector():
    model = models.build("encoder_classifier", vocab_size=17, num_classes=10, max_length=16, num_layers=1,
                         embed_dim=8, num_heads=2, mlp_dim=12, pooling="mean", head="mlp", dropout_rate=0.0,
                         attention_dropout_rate=0.0)
    tokens = jax.random.randint(jax.random.key(0), (3, 16), 1, 17)
    variables = model.init(jax.random.key(1), tokens)
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    assert params["head_hidden"]["kernel"].shape == (8, 12) and params["head"]["kernel"].shape == (12, 10)
    _, state = model.apply(variables, tokens, capture_intermediates=True, mutable=["intermediates"])
    trunk_out = np.asarray(state["intermediates"]["trunk"]["__call__"][0][0])  # (x, mask)
    pooled = trunk_out.mean(axis=1)
    hidden = np.maximum(pooled @ params["head_hidden"]["kernel"] + params["head_hidden"]["bias"], 0)
    expected = hidden @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(model.apply(variables, tokens), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.head must be 'linear' or 'mlp'"):
        models.build("encoder_classifier", vocab_size=17, num_classes=10, head="deep").init(
            jax.random.key(1), jnp.ones((1, 4), jnp.int32))
