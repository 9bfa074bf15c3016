"""Config validation: numeric ranges and finiteness, one-line errors, and the unused-attention-params warning."""

import logging
import math

import pytest

from configs import common
from effjax.train.validate import NUMERIC_RANGES, validate


def check(config):
    validate(config, process_count=1, batch_shards=1)


@pytest.mark.parametrize("path, value, valid", [
    ("learning_rate", -1.0, "(0, inf)"),
    ("learning_rate", 0.0, "(0, inf)"),
    ("learning_rate", math.nan, "(0, inf)"),
    ("learning_rate", math.inf, "(0, inf)"),
    ("weight_decay", -0.1, "[0, inf)"),
    ("adam_b1", 1.0, "[0, 1)"),
    ("adam_b2", -0.5, "[0, 1)"),
    ("label_smoothing", 1.0, "[0, 1)"),
    ("grad_clip_norm", -1.0, "[0, inf)"),
    ("total_steps", 0, "[1, inf)"),
    ("warmup_steps", -1, "[0, inf)"),
    ("model.dropout_rate", 1.0, "[0, 1)"),
    ("model.attention_dropout_rate", math.nan, "[0, 1)"),
    ("model.num_heads", 0, "[1, inf)"),
])
def test_out_of_range_numbers_fail_in_one_line_naming_field_value_and_range(path, value, valid):
    config = common.get_base_config()
    parent, _, key = path.rpartition(".")
    (config[parent] if parent else config)[key] = value
    with pytest.raises(ValueError) as error:
        check(config)
    message = str(error.value)
    assert "\n" not in message
    assert message == f"config.{path}={value!r} is invalid: it must be a finite number in {valid}."


def test_every_config_default_is_in_range():
    config = common.get_base_config()
    check(config)
    for path in NUMERIC_RANGES:
        parent, _, key = path.rpartition(".")
        assert key in (config[parent] if parent else config), path  # no stale entry in the table


def test_params_of_a_method_no_layer_uses_warn_once(caplog):
    config = common.get_base_config()
    with caplog.at_level(logging.WARNING):
        check(config)  # every method's defaults are in the config: no warning
    assert not caplog.records
    config.model.attention_params.performer.num_features = 128
    config.model.attention_params.softmax.impl = "xla"  # a used method's setting is fine
    with caplog.at_level(logging.WARNING):
        check(config)
    [record] = caplog.records
    assert record.getMessage() == ("config.model.attention_params sets performer.num_features=128, but no layer "
                                   "uses that method (the layers use softmax); the setting has no effect.")


def test_params_of_a_used_method_do_not_warn(caplog):
    config = common.get_base_config()
    config.model.attention = "performer"
    config.model.attention_params.performer.num_features = 128
    with caplog.at_level(logging.WARNING):
        check(config)
    assert not caplog.records
