"""Every config file loads, validates and (for the smoke variants) trains end to end; the byte LM learns."""

import glob
import importlib
import math
import os

import numpy as np
import pytest
from helpers import ROOT, slow_after

import effjax.data as data
from effjax.train import trainer
from effjax.train.validate import validate

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))
ARGS = {"lra_listops": [None, "cpu", "smoke"], "lm_bytes": [None, "smoke", "primer_ez"],
        "lm_recurrent": [None, "size=smoke", "method=mamba2,attention_every=4", "method=rwkv7,size=cpu,form=recurrent"],
        **{name: [None, "full", "synthetic"] for name in CONFIGS if name.startswith("search_")}}


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name, arg", [(n, a) for n in CONFIGS for a in ARGS.get(n, [None, "smoke"])])
def test_config_is_complete_and_valid(name, arg):
    config = load(name, arg)
    trainer_config = config.proxy if name.startswith("search_") else config  # a search trains its proxy task
    validate(trainer_config, process_count=1, batch_shards=1)
    assert trainer_config.data.name and trainer_config.model.name
    assert load(name, arg).to_dict() == config.to_dict()  # deterministic


def test_config_args_are_checked():
    with pytest.raises(ValueError, match="Unknown config arg 'cpuu'"):
        load("lra_listops", "cpuu")
    with pytest.raises(ValueError, match="Unknown size 'tiny'"):
        load("lm_recurrent", "size=tiny")
    with pytest.raises(ValueError, match="has no 'form' parameter"):
        load("lm_recurrent", "method=softmax,form=recurrent")


def test_recurrent_lm_hybrid_puts_softmax_in_every_nth_layer():
    config = load("lm_recurrent", "method=gated_deltanet,attention_every=4")
    assert config.model.attention == "gated_deltanet" and config.model.full_attention == "softmax"
    assert tuple(config.model.full_attention_layers) == (3,) and config.model.num_layers == 4
    from effjax.models.layer_attention import resolve
    assert [method for method, _ in resolve(config.model)] == ["gated_deltanet"] * 3 + ["softmax"]


def lm_sources(config):
    params = {k: v for k, v in config.data.to_dict().items() if k != "name"}
    return [data.make_source(config.data.name, split, **params) for split in ("train", "validation")]


def unigram_entropy(source) -> float:
    """Nats per next-token target of the best unigram (byte-frequency) model of ``source``'s own targets: the
    loss of a model that learned the byte frequencies of exactly this data and nothing about context."""
    inputs = np.stack([source[i]["inputs"] for i in range(len(source))])
    targets = inputs[:, 1:][inputs[:, 1:] != 0]
    p = np.bincount(targets, minlength=source.vocab_size) / targets.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_byte_lm_beats_the_unigram_entropy_of_its_validation_data(tmp_path):
    # 200 steps learn context: the loss over the whole validation split falls below the entropy of that
    # split's own byte frequencies, which no context-free model can go below.
    config = load("lm_bytes", "smoke")
    config.total_steps, config.learning_rate = 200, 3e-3
    config.eval_every = config.checkpoint_every = config.eval_max_batches = 0
    config.log_every = 50
    result = trainer.train_and_evaluate(config, str(tmp_path))
    unigram = unigram_entropy(lm_sources(config)[1])
    assert result["eval/loss"] < unigram - 0.1, (result, unigram)


@pytest.mark.parametrize("name", slow_after(["vit_cifar10", "lra_text", "lra_image"], keep=0))
def test_tfds_configs_run_end_to_end_on_mock_data(tmp_path, name):
    # Mock examples have random labels, so there is nothing to learn: this checks that each config builds,
    # trains its 4 steps and evaluates to finite numbers, not that it learns.
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=32):
        result = trainer.train_and_evaluate(load(name, "smoke"), str(tmp_path))
    assert result["step"] == 4 and math.isfinite(result["eval/loss"])
    assert 0.0 <= result["eval/accuracy"] <= 1.0 and 0.0 < result["eval/majority_class_rate"] <= 1.0


def test_every_attention_method_has_its_params_in_the_config():
    from effjax import attention
    from effjax.models.layer_attention import method_params

    table = load("lra_listops").model.attention_params
    assert sorted(table.keys()) == attention.names()
    for method in attention.names():
        assert set(table[method].keys()) == set(attention.defaults(method))
        attention.make(method, **method_params(method, table))  # defaults build
