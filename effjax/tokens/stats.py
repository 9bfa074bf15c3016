"""The attention statistics a token-reduction method may read from the block it sits in.

Built by ``MultiHeadAttention(with_stats=True)`` from the block's own q, k, v, so they cost nothing unless a
method reads them (XLA drops what is unused). The probabilities are recomputed from q and k as softmax
attention computes them, so they are only offered for layers whose attention is ``softmax`` (with the same key
bias and padding); any other layer's method refuses a method that needs them, with the layer named.
"""

import dataclasses

import jax
import jax.numpy as jnp

# Attention methods whose weights are exactly softmax(q k^T / sqrt(d) + key_bias) over the real keys.
PROBABILITY_METHODS = ("softmax",)


@dataclasses.dataclass(frozen=True)
class AttentionStats:
    q: jax.Array  # [batch, n, heads, head_dim]
    k: jax.Array
    v: jax.Array
    key_bias: jax.Array | None = None  # [batch, n]
    mask: jax.Array | None = None  # [batch, n]
    method: str = "softmax"

    def keys(self):
        """Keys averaged over heads, ToMe's merge metric (Sec. 3.2) [batch, n, head_dim], float32."""
        return jnp.mean(self.k.astype(jnp.float32), axis=2)

    def values(self):
        return self.v

    def _logits(self, q):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), self.k.astype(jnp.float32))
        logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
        if self.key_bias is not None:
            logits = logits + self.key_bias[:, None, None, :]
        if self.mask is not None:
            logits = jnp.where(self.mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        return logits

    def probabilities(self):
        """The softmax attention weights [batch, heads, n, n] (float32)."""
        check_probabilities(self.method)
        return jax.nn.softmax(self._logits(self.q), axis=-1)

    def cls_attention(self):
        """The first token's attention row [batch, heads, n], recomputed in O(n d) (float32)."""
        check_probabilities(self.method)
        return jax.nn.softmax(self._logits(self.q[:, :1]), axis=-1)[:, :, 0]


def check_probabilities(method: str, layer: int | None = None, token_method: str = "") -> None:
    if method not in PROBABILITY_METHODS:
        where = "" if layer is None else f" on layer {layer}"
        who = f"token method {token_method!r}" if token_method else "this token method"
        raise ValueError(f"{who} needs the attention probabilities, but attention method {method!r}{where} does "
                         f"not compute them; use {', '.join(PROBABILITY_METHODS)} on the reduced layers "
                         "(model.attention per layer) or a token method that needs only keys (tome).")
