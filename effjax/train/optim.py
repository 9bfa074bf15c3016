"""Learning-rate schedules and the AdamW optimizer built from the config."""

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


def make_optimizer(config):
    """AdamW (decoupled weight decay on every parameter) with optional global-norm clipping."""
    schedule = make_schedule(config)
    adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
    return adamw, schedule
