"""Self-pretraining of the encoder on the task's own inputs (Amos, Berant & Gupta, "Never Train from Scratch",
ICLR 2024, Sec. 3): masked (bidirectional) or causal (next-token) denoising of the training inputs, then
fine-tuning ``encoder_classifier`` from it with ``config.init_from``.

The trunk is ``encoder_classifier``'s: the same ``Trunk`` under the same name with the same CLS prefix for
``pooling='cls'``, so every trunk param (embeddings, blocks, final norm) loads into the classifier and only its
``head`` starts fresh; this model's ``lm_head`` is left behind.

[MASK] is token id 0, the padding row of ``token_embed``, with the key-padding mask still marking the position
real. Padding never reaches a prediction (it is masked out as a key and its outputs are not pooled), so that row is
otherwise unused, no data token collides with it, and the embedding table keeps the classifier's shape, which
``warm_start`` requires; an extra row would change every classifier checkpoint's shape instead.

The output layer is a separate (untied) Dense over the vocabulary at every position, as in the paper's code (the
S4 code base's sequence decoder, a linear layer per position).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.models.encoder_classifier import check_pooling
from effjax.models.layers import Backbone, Trunk, dense_init, logical

TASK = "pretrain"  # trains on the inputs of any source (classification or lm); its labels are not used

OBJECTIVES = ("masked", "causal")
MASK_ID = 0  # the padding row, kept apart from padding by the key-padding mask (module docstring)
EVAL_MASK_SEED = 0  # evaluation masks come from this fixed key, so an evaluation is deterministic


def mask_positions(key, real, mask_rate: float):
    """bool [batch, length]: each real (non-padding) token is masked with probability ``mask_rate``."""
    return jax.random.bernoulli(key, mask_rate, real.shape) & real


def to_rows(tokens, documents: int):
    """[batch, documents * length] -> [documents * batch, length]: document d of example b is row d * batch + b."""
    return jnp.concatenate(jnp.split(tokens, documents, axis=1), axis=0) if documents > 1 else tokens


def from_rows(x, documents: int):
    """The inverse of ``to_rows`` (trailing axes carried along)."""
    return jnp.concatenate(jnp.split(x, documents, axis=0), axis=1) if documents > 1 else x


def check_settings(objective: str, mask_rate: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    if objective == "masked" and not 0.0 < mask_rate < 1.0:
        raise ValueError(f"model.mask_rate must be in (0, 1) for the masked objective, got {mask_rate} "
                         "(the paper: 0.5 for images, 0.15 for text, 0.1 for ListOps).")


class Model(Backbone, kw_only=True):
    """``encoder_classifier``'s trunk with a per-position vocabulary head, trained to denoise its input.

    ``objective='masked'``: a ``mask_rate`` share of the real tokens becomes [MASK] and the originals are predicted
    there, attending both ways. ``'causal'``: every token predicts the next one, with causal attention.
    ``num_classes`` is accepted and unused, so the classifier's model config serves both stages.
    """

    vocab_size: int
    num_classes: int | None = None
    max_length: int = 2000
    pooling: str = "cls"
    objective: str = "masked"
    mask_rate: float = 0.15
    documents: int = 1  # inputs hold this many equal-length documents (dual_encoder's pairs: 2), each its own row

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, length] int (0 = padding) -> ``{'logits': [batch, length, vocab] float32, 'targets':
        [batch, length] int, 'weights': [batch, length] float32}``: the loss's inputs (``tasks.pretrain``).

        Training masks come from the 'dropout' stream; evaluation masks from a fixed key."""
        check_pooling(self.pooling)
        check_settings(self.objective, self.mask_rate)
        if tokens.shape[1] % self.documents:
            raise ValueError(f"model.documents={self.documents} does not divide the input length {tokens.shape[1]}; "
                             "set it to the number of documents per example (2 for data 'aan').")
        out = self.denoise(to_rows(tokens, self.documents), deterministic)
        return {key: from_rows(value, self.documents) for key, value in out.items()}

    def denoise(self, tokens, deterministic):
        real = tokens != 0
        causal = self.objective == "causal"
        if causal:
            targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
            weights = real & (targets != 0)
            inputs = tokens
        else:
            key = jax.random.key(EVAL_MASK_SEED) if deterministic else self.make_rng("dropout")
            weights = mask_positions(key, real, self.mask_rate)
            targets, inputs = tokens, jnp.where(weights, MASK_ID, tokens)
        prefix = int(self.pooling == "cls")
        x, _ = Trunk(**self.backbone_fields(), vocab_size=self.vocab_size, max_length=self.max_length,
                     prefix_tokens=prefix, name="trunk")(inputs, mask=real, causal=causal,
                                                         deterministic=deterministic)
        if x.shape[1] != tokens.shape[1] + prefix:
            raise ValueError("encoder_pretrain predicts a token at every position, but model.distil or model.tokens "
                             "shortens the sequence inside the trunk; turn them off for the pretraining stage.")
        logits = nn.Dense(self.vocab_size, kernel_init=logical(dense_init, ("embed", "vocab")),
                          bias_init=logical(nn.initializers.zeros, ("vocab",)), name="lm_head")(x[:, prefix:])
        return {"logits": logits.astype(jnp.float32), "targets": targets, "weights": weights.astype(jnp.float32)}
