"""Normalisation layers: LayerNorm, Primer's norm, and SLAB's progressive re-parameterised BatchNorm (PRepBN).

primer_norm (So et al., NeurIPS 2021, full Primer; the released code's ``primer_norm``): ``mean = mean(x)``,
``pseudo_variance = mean(x * (x - mean))``, ``y = (x - mean) * rsqrt(pseudo_variance + eps) * scale + bias``
over the features. It equals LayerNorm algebraically (``mean(x (x - mean)) = mean((x - mean)^2)``) and keeps its
own numerics (float32 statistics). ``NORM_LAYOUTS`` say where a block puts its norms (``Block.norm_layout``).

PRepBN (Guo et al., ICML 2024, "SLAB", Sec. 3.2): ``RepBN(x) = BN(x) + alpha * x`` with a learnable
scalar alpha (init 1), and during training ``gamma * LN(x) + (1 - gamma) * RepBN(x)`` where gamma decays
linearly from 1 to 0 over ``prepbn_steps`` steps after ``prepbn_warmup`` steps of pure LN; evaluation
always uses RepBN. BN statistics run over (batch, length) on real tokens only (``mask``).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

NORMS = ("layernorm", "primer", "prepbn")
# 'pre': x + f(norm(x)) for both sublayers; 'pre_post' (full Primer's PrePostNormLayerStack): the attention
# sublayer pre-norm, the feed-forward one x + norm(ffn(x)), its norm on the output inside the residual branch.
NORM_LAYOUTS = ("pre", "pre_post")


def logical(init, axes):
    return nn.with_logical_partitioning(init, axes)


def layer_norm(dtype, name=None, epsilon: float = 1e-6):
    """LayerNorm whose scale and bias are sharded along the embedding axis (epsilon 1e-6 as timm's ViT)."""
    return nn.LayerNorm(dtype=dtype, name=name, epsilon=epsilon,
                        scale_init=logical(nn.initializers.ones, ("embed",)),
                        bias_init=logical(nn.initializers.zeros, ("embed",)))


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {norm!r}.")


def check_norm_layout(layout: str) -> None:
    if layout not in NORM_LAYOUTS:
        raise ValueError(f"model.norm_layout must be one of {', '.join(NORM_LAYOUTS)}, got {layout!r}.")


def primer_norm(x, scale, bias, epsilon: float = 1e-6):
    """Primer's norm over the last axis, statistics in float32: ``(x - mean) rsqrt(mean(x (x - mean)) + eps)``,
    then ``* scale + bias``."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    pseudo_variance = jnp.mean(x * (x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(pseudo_variance + epsilon) * scale + bias


class PrimerNorm(nn.Module):
    """``primer_norm`` with learned ``scale`` (init 1) and ``bias`` (init 0), sharded along the embedding axis as
    ``layer_norm``'s."""

    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), features, jnp.float32)
        bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), features, jnp.float32)
        return primer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def prepbn_gamma(step, total_steps: int, warmup_steps: int):
    """The LN weight gamma at training ``step``: 1 during warm-up, then a linear decay to 0."""
    progress = (step - warmup_steps) / max(total_steps, 1)
    return jnp.clip(1.0 - progress, 0.0, 1.0).astype(jnp.float32)


class RepBN(nn.Module):
    """BN(x) + alpha * x over [batch, length, embed]; statistics from real tokens (PyTorch momentum 0.1)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, mask=None, deterministic=True):
        bn = nn.BatchNorm(use_running_average=deterministic, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                          scale_init=logical(nn.initializers.ones, ("embed",)),
                          bias_init=logical(nn.initializers.zeros, ("embed",)))
        stats_mask = None if mask is None else jnp.broadcast_to(mask[..., None], x.shape)
        alpha = self.param("alpha", nn.initializers.ones, (), jnp.float32)
        return bn(x, mask=stats_mask) + (alpha * x).astype(x.dtype)


class Norm(nn.Module):
    """``norm`` in NORMS; for 'prepbn' the caller passes the current ``gamma`` while training."""

    norm: str = "layernorm"
    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6  # LayerNorm's (Hugging Face ViT checkpoints use 1e-12)

    @nn.compact
    def __call__(self, x, *, mask=None, gamma=None, deterministic=True):
        check_norm(self.norm)
        if self.norm == "layernorm":
            return layer_norm(self.dtype, "layer_norm", self.epsilon)(x)
        if self.norm == "primer":
            return PrimerNorm(self.dtype, self.epsilon, name="primer_norm")(x)
        # Created at init too, so train and eval share params.
        ln = layer_norm(self.dtype, "layer_norm", self.epsilon)(x)
        rep = RepBN(self.dtype, name="rep_bn")(x, mask=mask, deterministic=deterministic)
        if deterministic or gamma is None:
            return rep
        return (gamma * ln + (1.0 - gamma) * rep).astype(x.dtype)


class PRepBNSchedule(nn.Module):
    """Counts training calls in the ``norm_progress`` collection and returns gamma (None when not PRepBN)."""

    norm: str = "layernorm"
    total_steps: int = 60000
    warmup_steps: int = 0

    @nn.compact
    def __call__(self, *, deterministic=True):
        if self.norm != "prepbn":
            return None
        counter = self.variable("norm_progress", "step", lambda: jnp.zeros((), jnp.int32))
        gamma = prepbn_gamma(counter.value, self.total_steps, self.warmup_steps)
        if not deterministic and not self.is_initializing():
            counter.value = counter.value + 1
        return gamma
