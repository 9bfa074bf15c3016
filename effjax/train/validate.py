"""Config checks that run before anything touches the workdir; each error names the field."""

import effjax.models
from effjax import attention
from effjax.train.optim import SCHEDULES


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(config, *, process_count: int, batch_shards: int) -> None:
    """Raises ValueError for the first inconsistency in ``config``."""
    for field in ("total_steps", "batch_size", "eval_batch_size", "keep_checkpoints", "log_every"):
        _require(config[field] > 0, f"config.{field} must be positive, got {config[field]}.")
    for field in ("eval_every", "checkpoint_every", "eval_max_batches", "warmup_steps"):
        _require(config[field] >= 0, f"config.{field} must be >= 0, got {config[field]}.")
    _require(config.schedule in SCHEDULES,
             f"config.schedule {config.schedule!r} is unknown; known: {', '.join(SCHEDULES)}.")
    effjax.models.task_of(config.model.name)
    for method in attention.resolve_per_layer(config.model.attention, config.model.num_layers):
        attention.make(method, **attention.params_for(method, config.model.attention_params))
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        _require(size % process_count == 0,
                 f"config.{field}={size} is not divisible by the {process_count} processes; "
                 f"use a multiple of {process_count}.")
        _require(size % batch_shards == 0,
                 f"config.{field}={size} is not divisible by the data-parallel mesh size {batch_shards} "
                 f"(config.mesh data x fsdp); use a multiple of {batch_shards}.")
    data_length = config.data.get("max_length")
    if data_length is not None and config.model.get("max_length") is not None:
        _require(data_length <= config.model.max_length,
                 f"config.data.max_length={data_length} exceeds config.model.max_length="
                 f"{config.model.max_length}: raise the model's maximum or shorten the data.")
