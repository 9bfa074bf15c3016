"""Sliding-window (local) attention: Longformer's local pattern (Beltagy et al. 2020, Sec. 3.1, Fig. 2b)."""

from flax import linen as nn

from effjax.attention import decoding, patterns, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_qkv, dropout_kwargs
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "sliding_window"
CAPABILITIES = Capabilities(causal=True, mask=True, segments=True, cross=True, dropout=True, pallas=True,
                            decode=True, extend=True, grouped_kv=True,
                            notes="k, v may have fewer heads than q (grouped-query attention: the kernels get them "
                                  "repeated, the decoding ring holds the kv heads only); decoding keeps a ring buffer "
                                  "of window + 1 keys/values (max_length if fewer): its memory is bounded by the "
                                  "window, not the context.")


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, window=256, dropout_rate=0.0,
           dropout_rng=None, impl="xla"):
    """Softmax over the keys with |i - j| <= ``window`` (one-sided; 2*window + 1 keys per query).

    ``causal`` keeps keys [i - window, i]. For cross attention (kv_len != q_len) queries are aligned
    to the end, as for causal softmax. A window >= the length is simply full attention (no error).
    ``impl="xla"``: masked O(N^2) softmax, exact but not faster than ``softmax``. Other ``impl``
    (``kernels.dispatch``, op "attention" with ``window``), e.g. "pallas": the flash kernel skipping the key
    blocks outside the window (O(N * window)); dropout with the kernel's own draws.
    """
    check_qkv(NAME, q, k, v, grouped=True)
    check_impl(NAME, impl)
    if window < 0:
        raise ValueError(f"{NAME}: window must be >= 0, got {window}.")

    def xla():
        pair = patterns.band(q.shape[1], k.shape[1], window)
        return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal,
                              pair_mask=pair[None, None], dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    if impl == "xla":
        return xla()
    k, v = softmax.repeat_kv(k, q.shape[2]), softmax.repeat_kv(v, q.shape[2])  # the kernels: one kv head per head
    call = dict(q=q, k=k, v=v, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
                **softmax.kernel_dropout(dropout_rate, dropout_rng))
    return dispatch.run("attention", impl, call, xla=xla, where=NAME)


class Attention(nn.Module):
    """Linen wrapper of ``attend``; ``window`` is one-sided (longformer-base-4096: 512 total, 256 a side)."""

    window: int = 256
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the flash kernel with window block skipping

    def init_cache(self, batch, max_length, heads, head_dim, dtype):
        """A ring buffer of ``window + 1`` key/value slots (``max_length`` if fewer; ``effjax.attention.decoding``):
        the causal query at i sees keys i - window..i, so older ones are overwritten."""
        return decoding.kv_init(batch, min(self.window + 1, max_length), heads, head_dim, dtype)

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        """``cache``: a decoding call (prefill, or a step with ``positions``; ``decoding``), returns
        ``(out, cache)``."""
        def forward():
            return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, window=self.window,
                          impl=self.impl, **dropout_kwargs(self, deterministic))

        if cache is None:
            return forward()
        decoding.check_call(NAME, q, causal=causal, segment_ids=segment_ids, positions=positions)
        return decoding.kv_decode(NAME, q, k, v, cache, positions, mask, forward=forward, window=self.window)


