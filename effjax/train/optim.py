"""Learning-rate schedules and the AdamW optimizer built from the config."""

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "rsqrt")


def make_schedule(config):
    """Step -> learning rate for ``config.schedule`` with linear warmup over ``config.warmup_steps``."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps

    def warmup_factor(step):
        return jnp.minimum(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    if config.schedule == "constant":
        return lambda step: peak * warmup_factor(step)
    if config.schedule == "cosine":
        def cosine(step):
            progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
            return peak * warmup_factor(step) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return cosine
    if config.schedule == "rsqrt":
        # LRA's constant * linear_warmup * rsqrt_decay: peaks at lr / sqrt(warmup) at step = warmup.
        return lambda step: peak * warmup_factor(step) / jnp.sqrt(jnp.maximum(step + 1, max(warmup, 1)))
    raise ValueError(f"Unknown config.schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}.")


def param_path(path) -> str:
    """A param's path as ``config.trainable`` matches it: the dict keys joined by '/'."""
    return "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def frozen_mask(pattern: str):
    """``params -> bool tree``: True for the params ``re.search(pattern, path)`` does not match (frozen); refuses
    a pattern that matches no param, showing some paths."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"config.trainable={pattern!r} is not a regular expression ({err}).") from None

    def labels(params):
        paths = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        if not any(regex.search(path) for path in paths):
            raise ValueError(f"config.trainable={pattern!r} matches no parameter; paths look like "
                             f"{', '.join(repr(p) for p in paths[:3])}.")
        return jax.tree_util.tree_map_with_path(lambda path, _: not regex.search(param_path(path)), params)

    return labels


def make_optimizer(config):
    """AdamW (decoupled weight decay on every parameter) with optional global-norm clipping; with
    ``config.trainable`` only the matching params are updated, e.g. DiffRate's rate proxies on a frozen ViT: the
    others' gradients are zeroed before clipping and Adam, and their updates (weight decay) after.

    Frozen params keep (zero) Adam moments: ``optax.multi_transform`` would drop them, but its ``MaskedNode``
    placeholders do not pass through flax's logical-to-mesh sharding of the optimizer state."""
    schedule = make_schedule(config)
    tx = [optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)]
    if config.grad_clip_norm > 0:
        tx.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    if config.get("trainable"):
        freeze = optax.masked(optax.set_to_zero(), frozen_mask(config.trainable))
        tx = [freeze, *tx, freeze]
    return (tx[0] if len(tx) == 1 else optax.chain(*tx)), schedule
