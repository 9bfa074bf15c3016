"""cosFormer (Qin et al., ICLR 2022), cos-reweighted ReLU attention: relu(q_i).relu(k_j) cos(pi (i-j) / 2M)."""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "cosformer"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=False, cross=True, dropout=False, pallas=True,
                            decode=True, extend=True,
                            notes="decoding keeps the running sums sum phi(k) v^T [heads, 2 head_dim, head_dim] "
                                  "and sum phi(k) [heads, 2 head_dim] in float32, constant in the context length, "
                                  "and fixes M = max_len, or the cache's max_length when max_len is None: it "
                                  "equals the forward pass over sequences padded to max_length.")


def _reweighted(x, horizon, index=None):
    """[relu(x_i) sin(pi i / 2M), relu(x_i) cos(pi i / 2M)] with 1-based i: [b, l, h, 2d] in float32.

    ``horizon`` M: a number, or int ``[batch]`` (a decoding cache's); ``index``: the 1-based positions ``[batch,
    l]`` (a decoding step's), default ``1 .. l``.
    """
    x = jax.nn.relu(x.astype(jnp.float32))
    if index is None:
        index = jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[None, :]
    if isinstance(horizon, (int, float)):
        rate = math.pi / (2.0 * horizon)
    else:
        rate = (math.pi / (2.0 * jnp.asarray(horizon, jnp.float32)))[:, None]
    angle = (rate * index.astype(jnp.float32))[:, :, None, None]
    return jnp.concatenate([x * jnp.sin(angle), x * jnp.cos(angle)], axis=-1)


def _attend(q, k, v, horizon, *, mask, causal, chunk_size, impl):
    return ka.normalized_attention(_reweighted(q, horizon), _reweighted(k, horizon), v, mask=mask, causal=causal,
                                   chunk_size=chunk_size, method=NAME, impl=impl).astype(q.dtype)


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, max_len=None,
           chunk_size=ka.DEFAULT_CHUNK_SIZE, impl="xla"):
    """``sum_j relu(q_i).relu(k_j) cos(pi (i - j) / 2M) v_j / sum_j relu(q_i).relu(k_j) cos(...)``.

    As in the official code, positions are 1-based per sequence and M = max(q_len, kv_len), the
    **padded** lengths (so the re-weighting depends on how far a batch is padded, never on the padded
    values). ``max_len`` fixes M instead (e.g. for causal decoding); it must be >= both lengths so that
    every cos weight stays positive. The cos re-weighting is computed exactly as one kernel attention
    with features [phi sin, phi cos] (Ptolemy: cos(a - b) = cos a cos b + sin a sin b).
    ``segment_ids`` raise NotImplementedError. ``impl="pallas"`` runs ``kernels.linear_attention``.
    """
    check_qkv(NAME, q, k, v)
    ka.refuse_segments(NAME, segment_ids)
    longest = max(q.shape[1], k.shape[1])
    if max_len is None:
        horizon = longest
    elif not isinstance(max_len, int) or max_len < longest:
        raise ValueError(f"{NAME}: max_len (M) must be an int >= max(q_len, kv_len) = {longest}, got {max_len!r}.")
    else:
        horizon = max_len
    return _attend(q, k, v, horizon, mask=mask, causal=causal, chunk_size=chunk_size, impl=impl)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; no parameters.

    ``max_len`` None means M = max(q_len, kv_len) as in the paper's code. ``dropout_rate`` is accepted
    for the common interface but does not apply: the attention weights are never materialized.

    Decoding (``init_cache``, ``cache``/``positions``) keeps ``kernel_attention``'s running sums of the
    [sin, cos] features and M in the cache: ``max_len``, or the cache's ``max_length`` when ``max_len`` is None.
    The forward's M is the padded length, which a prefill cannot know, so decoding gives the outputs of the
    forward pass over sequences padded to ``max_length`` (M fixed, every cos weight positive up to it); the prefill
    is the causal forward of the prompts with that M. Positions must stay below M.
    """

    max_len: int | None = None
    chunk_size: int = ka.DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """``{"sums": kernel_attention.state_init (2 * head_dim features, float32), "horizon": M [batch]}``."""
        if self.max_len is not None and self.max_len < max_length:
            raise ValueError(f"{NAME}: max_len (M) = {self.max_len} is below the cache's max_length {max_length}: "
                             "the cos weights of positions past M would turn negative.")
        horizon = self.max_len or max_length
        return {"sums": ka.state_init(batch, heads, 2 * head_dim, head_dim),
                "horizon": decoding.boxed_full((batch,), horizon, jnp.int32, ("batch",))}

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        if cache is None:
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, max_len=self.max_len,
                          chunk_size=self.chunk_size, impl=self.impl)
        check_qkv(NAME, q, k, v)
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        ka.check_self_attention(NAME, q, k)
        horizon = cache["horizon"]
        index = None if positions is None else decoding.token_positions(positions, q.shape[1]) + 1  # 1-based

        def forward():
            return _attend(q, k, v, horizon, mask=mask, causal=True, chunk_size=self.chunk_size, impl=self.impl)

        phi_q, phi_k = (_reweighted(x, horizon, index) for x in (q, k))
        out, sums = ka.decode(NAME, cache["sums"], phi_q, phi_k, v, positions, mask, forward=forward)
        return out.astype(q.dtype), {"sums": sums, "horizon": horizon}
