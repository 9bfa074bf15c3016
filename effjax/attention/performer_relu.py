"""Performer with the generalized ReLU kernel (Choromanski et al., ICLR 2021, Sec. 2.2): phi(x) = relu(W x) + 1e-3."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention import decoding, performer
from effjax.attention import kernel_attention as ka
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv

NAME = "performer_relu"
CAPABILITIES = Capabilities(
    causal=True, mask=True, segments=True, cross=True, dropout=False, pallas=True,
    decode=True, extend=True,
    notes="segment_ids are refused with causal=True and with impl='pallas'. Decoding keeps the running sums "
          "sum phi(k) v^T [heads, num_features, head_dim] and sum phi(k) [heads, num_features] in float32 "
          "(head_dim features with random_features=False), constant in the context length; it uses the stored "
          "projection (redraw=True decodes only with deterministic=True).",
)
KERNEL_EPSILON = 1e-3  # the reference's kernel_epsilon, added to every feature


def feature_map(x, projection=None, kernel_epsilon=KERNEL_EPSILON):
    """``relu(W x) + eps`` (or ``relu(x) + eps`` without a projection), float32 [b, l, h, m].

    As in the reference's ``generalized_kernel_feature_creator`` with its default ``normalize_data=False``:
    no d^{-1/4} pre-scaling and no 1/sqrt(m) ratio.
    """
    x = x.astype(jnp.float32) if projection is None else performer.project(x, projection, normalize=False)
    return jax.nn.relu(x) + kernel_epsilon


def attend(q, k, v, projection=None, *, mask=None, segment_ids=None, causal=False, kernel_epsilon=KERNEL_EPSILON,
           chunk_size=ka.DEFAULT_CHUNK_SIZE, impl="xla"):
    """``phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j))`` with ``phi = relu(W .) + eps``.

    ``projection`` [num_features, head_dim] gets no gradient; ``None`` gives the reference's
    ``features_type='deterministic'`` (phi(x) = relu(x) + eps on the head dims). ``causal=True`` uses the
    chunked prefix sums; ``segment_ids`` (bidirectional only) restrict each query to its own segment.
    ``impl="pallas"`` runs ``kernels.linear_attention`` (no ``segment_ids``: NotImplementedError).
    """
    check_qkv(NAME, q, k, v)
    if projection is not None:
        projection = performer.check_projection(NAME, projection, q.shape[-1])
    phi_q, phi_k = (feature_map(x, projection, kernel_epsilon) for x in (q, k))
    out = ka.normalized_attention(phi_q, phi_k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                                  chunk_size=chunk_size, method=NAME, impl=impl)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper of ``attend`` owning the random projection, exactly as ``performer.Attention`` does.

    The projection (orthogonal blocks with chi-distributed row norms, the reference's 'ortho' type; or i.i.d.
    with ``orthogonal=False``) is the never-trained param ``frozen_projection``, drawn from the ``params``
    stream; ``redraw=True`` redraws it from the ``random`` stream on calls with ``deterministic=False``.
    ``random_features=False`` uses no projection (the reference's 'deterministic' features, which LRA ran).
    ``dropout_rate`` is accepted for the common interface but does not apply. Decoding (``init_cache``,
    ``cache``/``positions``) keeps the running sums of ``kernel_attention`` and uses the stored projection.
    """

    num_features: int = 256
    orthogonal: bool = True
    redraw: bool = False
    random_features: bool = True
    kernel_epsilon: float = KERNEL_EPSILON
    chunk_size: int = ka.DEFAULT_CHUNK_SIZE
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": kernels.linear_attention

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """The running sums ``kernel_attention.state_init`` (float32, whatever ``dtype``; ``max_length`` unused)."""
        features = self.num_features if self.random_features else head_dim
        return ka.state_init(batch, heads, features, head_dim)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        check_qkv(NAME, q, k, v)
        if cache is not None:
            decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
            ka.check_self_attention(NAME, q, k)
            if self.random_features:
                performer.check_decoding(NAME, self, deterministic)
        projection = None
        if self.random_features:
            projection = performer.projection_variable(self, q.shape[-1], deterministic, method=NAME)

        def forward():
            return attend(q, k, v, projection, mask=mask, segment_ids=segment_ids, causal=causal,
                          kernel_epsilon=self.kernel_epsilon, chunk_size=self.chunk_size, impl=self.impl)

        if cache is None:
            return forward()
        if projection is not None:
            projection = performer.check_projection(NAME, projection, q.shape[-1])
        phi_q, phi_k = (feature_map(x, projection, self.kernel_epsilon) for x in (q, k))
        out, cache = ka.decode(NAME, cache, phi_q, phi_k, v, positions, mask, forward=forward)
        return out.astype(q.dtype), cache
