"""MCTF: Multi-Criteria Token Fusion (Lee, Choi, Kim, CVPR 2024, "Multi-criteria Token Fusion with One-step-ahead
Attention for Efficient Vision Transformers", arXiv 2403.10030), Sec. 3.2, as in the released code (tokens.md
Sec. 6).

Tokens alternate into set A (even positions) and B (odd positions), as in ToMe. The edge weight between
``a in A`` and ``b in B`` multiplies three criteria (Eq. 3-6), with the released defaults ``tau_sim = 1``,
``tau_info = 20``, ``tau_size = 40``:
  * similarity ``W_sim = ((cos(x_a, x_b) + 1) / 2)^(1 / tau_sim)`` on the token features x (no gradient);
  * informativeness ``I_j = 1 / mean_{h,i} A_h[i, j]`` (the inverse of the attention token j receives),
    divided by its largest value, ``W_info = (I_a I_b)^(1 / tau_info)``;
  * size ``Z_j = 1 / s_j`` divided by its largest value, ``W_size = (Z_a Z_b)^(1 / tau_size)``.
Bidirectional bipartite matching (Sec. 3.2): ``r1 = r // 2`` A tokens with the heaviest edges merge into their
best B partners (ToMe's step), then ``r2 = r - r1`` B tokens (with what they received) merge into their best
partner among the A tokens left, by the same weights transposed (not recomputed). Pooling (Eq. 7): each group
becomes ``sum_i a_i s_i x_i / sum_i a_i s_i`` with ``a_i`` the mean attention token i receives and ``s_i`` its
size (the reference's ``s / s_max`` scale cancels), computed once on the final groups, which equals pooling
step by step when a merged token carries the sum of its members' weights; sizes add. The CLS token (A row 0)
is never a source or destination and the distillation token (B column 0) receives nothing, so both stay first.
Output: the A tokens left (ascending), then the B tokens left (ascending); with a distillation token
``[A_0, B_0, A_1:, B_1:]``. ``r`` per layer is capped at half the non-prefix tokens (the schedule applies it).

Where it differs from the released code: MCTF reduces at the **start** of a block with that block's attention
map ("one-step-ahead"), then lets the block's attention reuse the merged map (keys summed, queries averaged)
instead of recomputing it. This interface reduces after the attention residual with the block's own map, so the
map is the one the just-run attention produced (the paper's one-step-ahead ablation off: the previous
attention's map judges informativeness) and the similarity metric is x after the attention residual. The
released code also never goes below 10 tokens (``r < 1`` as a fraction is the schedule's ``keep``); the token
reduction consistency training (two passes, CLS distillation) is the trainer's concern and not here.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import _ranking
from effjax.tokens import state as state_lib
from effjax.tokens._spec import Spec

SPEC = Spec(place="attention", needs=("probabilities",), max_prefix=2, cap=lambda n, prefix: (n - prefix) // 2,
            notes="reduces after this block's attention with its map (no one-step-ahead); "
                  "attention x size-weighted pooling on the final groups")


def attention_received(probabilities, mask=None):
    """``[batch, n]``: the mean over heads and (real) queries of the attention each token receives."""
    probabilities = jax.lax.stop_gradient(probabilities.astype(jnp.float32))
    if mask is None:
        return jnp.mean(probabilities, axis=(1, 2))
    rows = mask.astype(jnp.float32)
    return jnp.einsum("bhqk,bq->bk", probabilities, rows) / (
        probabilities.shape[1] * jnp.maximum(jnp.sum(rows, axis=1, keepdims=True), 1.0))


def weights(metric, received, sizes, tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
            mask=None):
    """The multi-criteria weights ``W [batch, |A|, |B|]`` between the even (A) and odd (B) positions."""
    tiny = jnp.finfo(jnp.float32).tiny
    real = jnp.ones(sizes.shape, bool) if mask is None else mask
    metric = jax.lax.stop_gradient(metric)
    w_sim = jnp.power((_ranking.cosine(metric[:, ::2], metric[:, 1::2]) + 1.0) / 2.0, 1.0 / tau_sim)
    info = jnp.where(real, 1.0 / jnp.maximum(received, tiny), 0.0)
    info = info / jnp.maximum(jnp.max(info, axis=1, keepdims=True), tiny)
    size = jnp.where(real, 1.0 / jnp.maximum(sizes, tiny), 0.0)
    size = size / jnp.maximum(jnp.max(size, axis=1, keepdims=True), tiny)
    w_info = jnp.power(info[:, ::2, None] * info[:, None, 1::2], 1.0 / tau_info)
    w_size = jnp.power(size[:, ::2, None] * size[:, None, 1::2], 1.0 / tau_size)
    w = w_sim * w_info * w_size
    return jnp.where(real[:, ::2, None] & real[:, None, 1::2], w, -1.0)  # padding: below any real pair


def bidirectional_matching(w, r: int, prefix: int = 1):
    """``assign [batch, n]`` (output slot of each token) and ``n - r`` for weights ``w [batch, |A|, |B|]``."""
    batch, n_a, n_b = w.shape
    n = n_a + n_b
    if r <= 0:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)), n
    r1 = r // 2
    r2 = r - r1
    rows = jnp.arange(batch)[:, None]
    w = jax.lax.stop_gradient(w.astype(jnp.float32))
    if prefix >= 1:
        w = w.at[:, 0, :].set(-jnp.inf)  # CLS: never a source (step 1) nor a destination (step 2)
    if prefix >= 2:
        w = w.at[:, :, 0].set(-jnp.inf)  # distillation token: never a destination (step 1) nor a source (step 2)
    # Step 1: A -> B.
    best_b = jnp.argmax(w, axis=2)
    rank_a = jnp.argsort(-jnp.max(w, axis=2), axis=1)  # heaviest edge first; the -inf CLS row last
    src_a = rank_a[:, :r1]
    a_merged = jnp.zeros((batch, n_a), bool).at[rows, src_a].set(True)
    # Step 2: B -> the A tokens left.
    wt = jnp.where(a_merged[:, :, None], -jnp.inf, w)
    best_a = jnp.argmax(wt, axis=1)  # [batch, n_b]
    rank_b = jnp.argsort(-jnp.max(wt, axis=1), axis=1)
    src_b = rank_b[:, :r2]
    b_merged = jnp.zeros((batch, n_b), bool).at[rows, src_b].set(True)
    # Output slots: the A tokens left, then the B tokens left, each ascending.
    a_slot = jnp.cumsum(~a_merged, axis=1) - 1
    n_a_left = n_a - r1
    b_slot = n_a_left + jnp.cumsum(~b_merged, axis=1) - 1
    if prefix >= 2:  # [A_0, B_0, A_1:, B_1:]
        a_slot = jnp.where(a_slot >= 1, a_slot + 1, a_slot)
        b_slot = jnp.where(jnp.arange(n_b)[None] == 0, 1, b_slot)  # B_0 is never a source: the rest move by one
    b_final = jnp.where(b_merged, jnp.take_along_axis(a_slot, best_a, axis=1), b_slot)
    a_final = jnp.where(a_merged, jnp.take_along_axis(b_final, best_b, axis=1), a_slot)
    assign = jnp.zeros((batch, n), jnp.int32).at[:, ::2].set(a_final).at[:, 1::2].set(b_final)
    return assign, n - r


def merge(x, tokens, metric, probabilities, r: int, prefix: int = 1, tau_sim: float = 1.0,
          tau_info: float = 20.0, tau_size: float = 40.0):
    """One MCTF step: ``(x', tokens')`` with ``n - r`` tokens (``r`` capped at half the non-prefix tokens)."""
    n = x.shape[1]
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return x, tokens
    received = attention_received(probabilities, tokens.mask)
    w = weights(metric, received, tokens.sizes, tau_sim, tau_info, tau_size, tokens.mask)
    assign, n_out = bidirectional_matching(w, r, prefix)
    return state_lib.reduce(x, tokens, assign, n_out, weights=received * tokens.sizes)


class Reducer(nn.Module):
    """MCTF after the block's attention: merges to ``keep`` tokens with the block's attention map."""

    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        return merge(x, tokens, x, stats.probabilities(), x.shape[1] - keep, prefix, self.tau_sim,
                     self.tau_info, self.tau_size)
