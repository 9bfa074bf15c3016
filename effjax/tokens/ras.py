"""RAS: Region-Adaptive Sampling for diffusion transformers (Liu et al., 2025, arXiv:2502.10389).

Sampler-level token reduction: at each RAS step of a rectified-flow sampler only the "fast-update" tokens go
through the DiT; the others reuse the noise (velocity) they got at their last update, and the DiT's attention
reads their keys/values from a cache [abs]. The pieces, as the official code computes them [code
``microsoft/RAS@a9c5ec8``, read for the catalog and re-checked for the selection direction]:
  * ``patch_metric``: ``diff = (sigma_next - sigma) * model_output`` per latent pixel; its standard deviation
    over channels (unbiased, as ``torch.std``; or the L2 norm, ``metric='l2norm'``) averaged over each
    ``patch x patch`` latent patch (one DiT token), row-major;
  * ``ras_scores``: ``metric * exp(starvation_scale * drop_count)``, where ``drop_count`` starts at ``-#sigmas``
    (``init_drop_count``) and grows by one each time a token is cached (``update_drop_count``);
  * ``select_active``: with ``n_cached = int((1 - sample_ratio) n)`` (the reference reads per-step counts from
    its manager, which can also ramp them), the code sorts the scores ascending and caches the highest
    (``high_ratio = 1``, ``cache='high'`` here) - the other tokens are active at the next step. Both index sets
    come back sorted and of static size, so a jitted DiT sees a fixed active length;
  * ``CachedTokens``: the last full-length model output; ``merge`` writes the active tokens' new output over it
    (the step's full output), ``update`` stores a full output.
Open item (catalog 12 and 18.6): as written, the starvation factor raises the score of often-cached tokens and
the highest scores are cached, so a cached token tends to stay cached - the opposite of the README's "a higher
starvation scale makes the patch selection more uniform". Both directions are exposed: ``cache='low'`` (cache
the lowest scores, update the highest) or a negative ``starvation_scale`` with ``cache='high'`` makes starved
tokens active; the tests check that uniformity grows with the scale in those forms and not in the literal one.
Not here: the sampler loop (RAS steps 4..30 minus the dense error-reset steps 12 and 22), the per-layer K/V
cache inside the DiT's attention, and the dynamic ratio ramp; effjax has no diffusion sampler yet. The
``Reducer`` therefore refuses to run inside a model's block loop.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from effjax.tokens._spec import Spec

SPEC = Spec(place="block", needs=(), learned=False, min_prefix=0, max_prefix=2,
            notes="Sampler-level (a diffusion loop), not a block reducer: pure functions ras_scores/select_active "
                  "and CachedTokens; the Reducer raises. Selection direction exposed (cache='high' as the code, "
                  "'low' as the README describes).")

METRICS = ("std", "l2norm")
CACHE = ("high", "low")


def patch_metric(noise_diff, patch: int = 2, metric: str = "std"):
    """Per-token change ``[batch, (H/p)(W/p)]`` of ``noise_diff [batch, H, W, C]``: the std over channels
    (unbiased) or L2 norm of each latent pixel, averaged over each ``patch x patch`` patch (row-major)."""
    if metric not in METRICS:
        raise ValueError(f"ras: metric must be one of {METRICS}, got {metric!r}.")
    batch, height, width, _ = noise_diff.shape
    if height % patch or width % patch:
        raise ValueError(f"ras: a {height}x{width} latent does not split into {patch}x{patch} patches.")
    d = noise_diff.astype(jnp.float32)
    per_pixel = jnp.std(d, axis=-1, ddof=1) if metric == "std" else jnp.linalg.norm(d, axis=-1)
    per_pixel = per_pixel.reshape(batch, height // patch, patch, width // patch, patch)
    return per_pixel.mean(axis=(2, 4)).reshape(batch, -1)


def init_drop_count(batch: int, num_tokens: int, num_sigmas: int):
    """The reference's starting drop counts: ``-num_sigmas`` for every token, ``[batch, num_tokens]``."""
    return jnp.full((batch, num_tokens), -float(num_sigmas), jnp.float32)


def ras_scores(noise_diff, patch: int, drop_count, starvation_scale: float = 0.1, metric: str = "std"):
    """``patch_metric(noise_diff) * exp(starvation_scale * drop_count)`` ``[batch, tokens]``."""
    return patch_metric(noise_diff, patch, metric) * jnp.exp(starvation_scale * drop_count)


def num_cached(num_tokens: int, sample_ratio: float) -> int:
    if not 0 < sample_ratio <= 1:
        raise ValueError(f"ras: sample_ratio must be in (0, 1], got {sample_ratio}.")
    return int((1.0 - sample_ratio) * num_tokens)


def select_active(scores, sample_ratio: float = 0.5, *, cache: str = "high"):
    """``(active [batch, n - c], cached [batch, c])`` sorted token indices, ``c = int((1 - sample_ratio) n)``:
    the ``c`` highest scores are cached with ``cache='high'`` (the reference code), the ``c`` lowest with
    ``cache='low'``; the rest are active (they go through the DiT at the next step)."""
    if cache not in CACHE:
        raise ValueError(f"ras: cache must be one of {CACHE}, got {cache!r}.")
    n = scores.shape[1]
    c = num_cached(n, sample_ratio)
    order = jnp.argsort(scores if cache == "low" else -scores, axis=-1, stable=True).astype(jnp.int32)
    return jnp.sort(order[:, c:], axis=-1), jnp.sort(order[:, :c], axis=-1)


def update_drop_count(drop_count, cached):
    """Adds one to the drop count of every ``cached [batch, c]`` token."""
    rows = jnp.arange(drop_count.shape[0])[:, None]
    return drop_count.at[rows, cached].add(1.0)


def take_tokens(x, index):
    """``x [batch, n, ...]`` at token positions ``index [batch, m]`` -> ``[batch, m, ...]`` (the DiT input of a
    RAS step)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@struct.dataclass
class CachedTokens:
    """The last full-length model output per token, ``[batch, n, d]`` (patchified noise / velocity)."""

    noise: jax.Array

    def merge(self, active_out, active):
        """The step's full output: ``active_out [batch, m, d]`` at tokens ``active [batch, m]``, the cached
        output elsewhere."""
        rows = jnp.arange(self.noise.shape[0])[:, None]
        return self.noise.at[rows, active].set(active_out.astype(self.noise.dtype))

    def update(self, full):
        return CachedTokens(full)


class Reducer(nn.Module):
    """RAS is no block reducer: it selects tokens across the steps of a diffusion sampler."""

    starvation_scale: float = 0.1
    sample_ratio: float = 0.5

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        raise NotImplementedError("ras selects tokens across the steps of a diffusion sampler (effjax has none yet): "
                                  "use effjax.tokens.ras.ras_scores/select_active/CachedTokens in a sampler loop.")
