"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

The filters apply in the order of Hugging Face's and fairseq's samplers: the logits are divided by the temperature,
then all but the ``top_k`` largest are dropped, then all but the smallest set of tokens whose probabilities sum to
at least ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1); the most
likely token always survives. ``temperature=0`` is greedy (argmax), which ignores the other two.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick each next token; ``check`` raises a one-line error for values outside their ranges."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def check(self) -> "Sampling":
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}.")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits, sampling: Sampling):
    """``logits [..., vocab]`` (float32) over temperature, with the tokens top-k and top-p drop at -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass of the more likely tokens
        kept = before < sampling.top_p  # the first token always (before = 0)
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def next_tokens(logits, keys, sampling: Sampling):
    """int32 ``[batch]`` next tokens from ``logits [batch, vocab]``; ``keys [batch]`` one PRNG key per sequence (so a
    sequence's draws do not depend on the rest of the batch); greedy ignores them."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filtered_logits(logits, sampling)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
