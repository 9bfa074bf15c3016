"""STViT semantic tokens (Chang et al., CVPR 2023, "Making Vision Transformers Efficient from a Token
Sparsification View"), the token-sparsification view for a plain ViT.

Semantic tokens are cluster centres: they are initialised by spatial pooling of the image tokens and refined by
attention [abs]; a few semantic tokens then replace the many image tokens for the following blocks. Here, before
a block (place 'block'), the ``P`` patch tokens become ``keep - prefix`` semantic tokens:
  1. pooling: the square ``g x g`` patch grid is cut into an ``a x b`` grid of cells (``a b = keep - prefix``,
     the most square factorisation with ``a, b <= g``); patch row ``r`` falls in cell row ``floor(r a / g)`` and
     column ``c`` in ``floor(c b / g)``, so every patch is in exactly one cell. Each cell's tokens are max-pooled
     (``pool='max'``, the adaptive max-pool of the STViT-R code) or size-weighted averaged (``pool='avg'``).
     PyTorch's adaptive pooling lets neighbouring cells overlap by a row when ``g`` is not a multiple of ``a``;
     here the cells do not overlap, so the source map is a function (each patch -> its cell). When the tokens
     are no longer the original square grid (a second STViT stage) or no such ``a x b`` exists (e.g. a prime
     count above ``g``), the cells are contiguous runs of the current token order (1-D adaptive pooling) - an
     effjax fallback, not in the paper;
  2. refinement: one multi-head cross-attention with queries = the pooled tokens and keys/values = all current
     tokens (prefix included, padding masked), added to the pooled tokens (a residual); learned, with its own
     projections (``num_heads`` heads).
The prefix tokens pass unchanged and stay first; ``keep == n`` returns the tokens unchanged. Sizes add over
each cell (each semantic token stands for its cell's patches) and the source map sends each patch to its cell's
semantic token, so ``recover`` paints a semantic token over its cell (STViT-R recovers with a learned
cross-attention instead; ``hot.Recover`` is one).
[mem]/unverified: the DeiT placement (which layer, how many semantic tokens: 16 per the abstract, e.g.
``keep=0.0817`` on 196 patches), the STViT-R details left out here (the learned "global centre" query, the
local-window first refinement over unfolded neighbourhoods, semantic-only blocks and the recovery block), and
whether the DeiT version pools by max or average. Fixed count, trained end to end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import CrossAttention
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="Pool-initialised semantic tokens (non-overlapping adaptive cells of the patch grid, max or avg) "
                  "refined by one cross-attention over all tokens; the source map sends a patch to its cell; "
                  "DeiT placement and count [mem]; no global-centre query or recovery block.")

POOLS = ("max", "avg")


def grid_shape(count: int, side: int):
    """The most square ``(a, b)`` with ``a * b == count`` and ``a, b <= side``, or None."""
    for a in range(math.isqrt(count), 0, -1):
        if count % a == 0 and count // a <= side:
            return a, count // a
    return None


def cells(num_patches: int, count: int, spatial: bool = True) -> np.ndarray:
    """Static ``[num_patches]`` cell index of each patch (row-major patches) for ``count`` cells: adaptive
    non-overlapping cells of the square grid when ``spatial`` and a grid factorisation exists, else contiguous
    runs (1-D adaptive pooling). Every cell gets at least one patch when ``count <= num_patches``."""
    if not 0 < count <= num_patches:
        raise ValueError(f"stvit: cannot pool {num_patches} tokens into {count} semantic tokens.")
    side = math.isqrt(num_patches)
    shape = grid_shape(count, side) if spatial and side * side == num_patches else None
    if shape is None:
        return (np.arange(num_patches) * count // num_patches).astype(np.int32)
    a, b = shape
    rows, cols = np.divmod(np.arange(num_patches), side)
    return (rows * a // side * b + cols * b // side).astype(np.int32)


def pool(x, tokens: state_lib.TokenState, count: int, prefix: int = 1, mode: str = "max"):
    """Pools the non-prefix tokens of ``x [batch, n, d]`` into ``count`` cell tokens (see ``cells``); returns
    ``(x' [batch, prefix + count, d], tokens')`` with sizes summed over each cell and the source map sending each
    patch to its cell."""
    if mode not in POOLS:
        raise ValueError(f"stvit: pool must be one of {POOLS}, got {mode!r} (model.tokens.params.pool).")
    batch, n, _ = x.shape
    spatial = n == tokens.source.shape[1]  # still the original token grid
    cell = cells(n - prefix, count, spatial)
    assign = jnp.broadcast_to(jnp.asarray(np.concatenate([np.arange(prefix), cell + prefix]), jnp.int32),
                              (batch, n))
    averaged, new = state_lib.reduce(x, tokens, assign, prefix + count)
    if mode == "avg":
        return averaged, new
    rest = x[:, prefix:]
    if tokens.mask is not None:
        rest = jnp.where(tokens.mask[:, prefix:, None], rest, -jnp.inf)
    pooled = jax.ops.segment_max(jnp.swapaxes(rest, 0, 1), jnp.asarray(cell), num_segments=count)
    pooled = jnp.swapaxes(pooled, 0, 1)
    pooled = jnp.where(jnp.isfinite(pooled), pooled, 0.0).astype(x.dtype)  # an all-padding cell
    return jnp.concatenate([x[:, :prefix], pooled], axis=1), new


class Reducer(nn.Module):
    """STViT before a block: ``keep - prefix`` semantic tokens, pooled from the patch grid and refined by one
    cross-attention over all tokens."""

    num_heads: int = 4
    pool: str = "max"

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        if keep >= x.shape[1]:  # nothing to sparsify: the layer is skipped (the model's plan never calls it so)
            return x, tokens
        pooled, new = pool(x, tokens, keep - prefix, prefix, self.pool)
        semantic = pooled[:, prefix:]
        refined = semantic + CrossAttention(self.num_heads, name="refine")(semantic, x, tokens.mask).astype(x.dtype)
        return jnp.concatenate([x[:, :prefix], refined], axis=1), new
