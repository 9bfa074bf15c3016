"""Every config file loads, validates and (for the smoke variants) trains end to end."""

import glob
import importlib
import os

import pytest
from helpers import ROOT

from effjax.train import trainer
from effjax.train.validate import validate

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))
ARGS = {"lra_listops": [None, "cpu", "smoke"]}


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name, arg", [(n, a) for n in CONFIGS for a in ARGS.get(n, [None, "smoke"])])
def test_config_is_complete_and_valid(name, arg):
    config = load(name, arg)
    validate(config, process_count=1, batch_shards=1)
    assert config.data.name and config.model.name
    assert load(name, arg).to_dict() == config.to_dict()  # deterministic


def test_config_args_are_checked():
    with pytest.raises(ValueError, match="Unknown config arg 'cpuu'"):
        load("lra_listops", "cpuu")


def test_byte_lm_smoke_trains_on_the_standard_library(tmp_path):
    result = trainer.train_and_evaluate(load("lm_bytes", "smoke"), str(tmp_path))
    assert result["step"] == 4 and result["eval/loss"] < 6.0  # below a uniform guess over 257 bytes (5.55 nats)
    assert "bits per token" in trainer.summary_line(result)


@pytest.mark.parametrize("name", ["lra_text", "lra_image", "vit_cifar10"])
def test_tfds_configs_train_on_mock_data(tmp_path, name):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=32):
        result = trainer.train_and_evaluate(load(name, "smoke"), str(tmp_path))
    assert result["step"] == 4 and 0.0 <= result["eval/accuracy"] <= 1.0


def test_every_attention_method_has_its_params_in_the_config():
    from effjax import attention
    from effjax.models.layer_attention import method_params

    table = load("lra_listops").model.attention_params
    assert sorted(table.keys()) == attention.names()
    for method in attention.names():
        assert set(table[method].keys()) == set(attention.defaults(method))
        attention.make(method, **method_params(method, table))  # defaults build
