"""Config checks that run before anything touches the workdir; each error is one line naming the field."""

import dataclasses
import math

from absl import logging

import effjax.models
from effjax import attention
from effjax.models import layer_attention, positions
from effjax.tokens import plan as token_plan
from effjax.tokens import spec as token_spec
from effjax.train.optim import SCHEDULES


@dataclasses.dataclass(frozen=True)
class Range:
    """The finite numbers from ``low`` to ``high``; ``low_open``/``high_open`` exclude an end."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1): probabilities of dropping, smoothing, Adam's decay rates

# Every numeric field a config may hold -> its valid range. Fields a config lacks are skipped.
NUMERIC_RANGES = {
    "total_steps": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "eval_batch_size": AT_LEAST_ONE,
    "keep_checkpoints": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
    "eval_every": NON_NEGATIVE,
    "checkpoint_every": NON_NEGATIVE,
    "eval_max_batches": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_b1": FRACTION,
    "adam_b2": FRACTION,
    "grad_clip_norm": NON_NEGATIVE,
    "label_smoothing": FRACTION,
    "model.max_length": AT_LEAST_ONE,
    "model.num_layers": AT_LEAST_ONE,
    "model.embed_dim": AT_LEAST_ONE,
    "model.num_heads": AT_LEAST_ONE,
    "model.mlp_dim": AT_LEAST_ONE,
    "model.dropout_rate": FRACTION,
    "model.attention_dropout_rate": FRACTION,
    "model.prepbn_steps": NON_NEGATIVE,
    "model.prepbn_warmup": NON_NEGATIVE,
    "mesh.fsdp": AT_LEAST_ONE,
    "mesh.tensor": AT_LEAST_ONE,
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _lookup(config, path: str):
    """The value at dotted ``path`` of ``config``, or None when a part of the path is missing."""
    for key in path.split("."):
        if config is None or key not in config:
            return None
        config = config[key]
    return config


def check_numeric_ranges(config) -> None:
    """ValueError naming the field, its value and its valid range for the first field of NUMERIC_RANGES
    outside that range (NaN and infinities are outside every range)."""
    for path, valid in NUMERIC_RANGES.items():
        value = _lookup(config, path)
        if value is not None:
            _require(value in valid, f"config.{path}={value!r} is invalid: it must be a finite number in {valid}.")


def set_params_of_unused_methods(attention_params, used_methods) -> list[str]:
    """``'<method>.<param>=<value>'`` for each param in ``attention_params`` (keyed by method) that differs from
    the method's default although no layer uses the method. Unset (``None``) params are not listed."""
    if hasattr(attention_params, "to_dict"):
        attention_params = attention_params.to_dict()
    found = []
    for method, params in sorted((attention_params or {}).items()):
        if method in used_methods or not isinstance(params, dict):
            continue
        defaults = attention.defaults(method)
        for key, value in sorted(params.items()):
            if value is not None and _as_tuple(value) != _as_tuple(defaults.get(key)):
                found.append(f"{method}.{key}={value!r}")
    return found


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def warn_about_unused_attention_params(model_config, used_methods) -> None:
    """Logs one warning line when ``model.attention_params`` sets params of methods no layer uses."""
    unused = set_params_of_unused_methods(model_config.get("attention_params"), used_methods)
    if unused:
        logging.warning("config.model.attention_params sets %s, but no layer uses that method (the layers use %s); "
                        "the setting has no effect.", ", ".join(unused), ", ".join(sorted(used_methods)))


def check_layer_attention(model_config) -> None:
    """Builds every layer's attention method with its resolved params (unknown names and params raise)."""
    layers = layer_attention.resolve(model_config)
    for method, params in layers:
        attention.make(method, **params)
    warn_about_unused_attention_params(model_config, {method for method, _ in layers})


def check_position(model_config) -> None:
    """``model.position``: one of ``effjax.models.positions.POSITIONS`` (absent: the model's default)."""
    position = model_config.get("position")
    if position is not None:
        positions.check_position(position)


def check_tokens(model_config) -> None:
    """``model.tokens``: the method, its params and the schedule's form (the counts are checked when the model
    knows its token count, at initialisation)."""
    tokens = model_config.get("tokens")
    if tokens is None or not tokens.get("method"):
        return
    num_layers = model_config.get("num_layers", layer_attention.FIELDS["num_layers"])
    token_plan.plan(tokens, num_layers=num_layers, num_tokens=2 ** 30, prefix=token_spec(tokens.method).min_prefix,
                    layer_methods=tuple(method for method, _ in layer_attention.resolve(model_config)))


def check_batch_division(config, process_count: int, batch_shards: int) -> None:
    """The global batches must split evenly over the processes and the data-parallel mesh axes."""
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        _require(size % process_count == 0,
                 f"config.{field}={size} is not divisible by the {process_count} processes; "
                 f"use a multiple of {process_count}.")
        _require(size % batch_shards == 0,
                 f"config.{field}={size} is not divisible by the data-parallel mesh size {batch_shards} "
                 f"(config.mesh data x fsdp); use a multiple of {batch_shards}.")


def check_lengths(config) -> None:
    """The data's longest sequence must fit the model's position table."""
    data_length = config.data.get("max_length")
    if data_length is not None and config.model.get("max_length") is not None:
        _require(data_length <= config.model.max_length,
                 f"config.data.max_length={data_length} exceeds config.model.max_length="
                 f"{config.model.max_length}: raise the model's maximum or shorten the data.")


def validate(config, *, process_count: int, batch_shards: int) -> None:
    """Raises ValueError for the first inconsistency in ``config``; warns about settings with no effect."""
    check_numeric_ranges(config)
    _require(config.schedule in SCHEDULES,
             f"config.schedule {config.schedule!r} is unknown; known: {', '.join(SCHEDULES)}.")
    effjax.models.task_of(config.model.name)
    check_layer_attention(config.model)
    check_position(config.model)
    check_tokens(config.model)
    check_batch_division(config, process_count, batch_shards)
    check_lengths(config)
