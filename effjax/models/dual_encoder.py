"""Two-tower document matcher of LRA Retrieval (Tay et al. 2021, Sec. 2.2.3 and App. A.1.3, Eq. 1).

One shared ``Trunk`` encodes each document on its own (no cross-attention); each tower has a real CLS
token (``pooling='cls'``) or mean-pools its real tokens. The head is ``MLP([X1, X2, X1*X2, X1-X2])``:
Dense(mlp_dim), ReLU, Dense(mlp_dim // 2), ReLU, Dense(num_classes). LRA's public dual encoders prepend no
CLS token and default to ``[X1, X2]`` (lra.md §7 item 6); ``interaction='concat'`` gives that head.
"""

import jax.numpy as jnp
from flax import linen as nn

from effjax.models.encoder_classifier import check_pooling, pool
from effjax.models.layers import Backbone, Trunk, dense_init, logical

TASK = "classification"  # the data this family trains on: a source with task == TASK
INTERACTIONS = ("nli", "concat")


def interaction_features(x1, x2, interaction: str):
    """The head's input: ``[X1, X2, X1*X2, X1-X2]`` ('nli') or ``[X1, X2]`` ('concat'), on the last axis."""
    if interaction == "nli":
        return jnp.concatenate([x1, x2, x1 * x2, x1 - x2], axis=-1)
    return jnp.concatenate([x1, x2], axis=-1)


def check_interaction(interaction: str) -> None:
    if interaction not in INTERACTIONS:
        raise ValueError(f"model.interaction must be 'nli' ([X1, X2, X1*X2, X1-X2]) or 'concat' ([X1, X2]), "
                         f"got {interaction!r}.")


class MatchingHead(nn.Module):
    """Dense(mlp_dim), ReLU, Dense(mlp_dim // 2), ReLU, Dense(num_classes): LRA's ``classifier_head_dual``."""

    mlp_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, features):
        # The hidden half-width layer has no logical name: one array cannot put 'mlp' on two dimensions.
        layers = ((self.mlp_dim, ("embed", "mlp"), "mlp"), (self.mlp_dim // 2, ("mlp", None), None),
                  (self.num_classes, (None, "classes"), "classes"))
        for i, (width, kernel_axes, bias_axis) in enumerate(layers):
            features = nn.Dense(width, kernel_init=logical(dense_init, kernel_axes),
                                bias_init=logical(nn.initializers.zeros, (bias_axis,)), name=f"dense_{i}")(features)
            if i < len(layers) - 1:
                features = nn.relu(features)
        return features.astype(jnp.float32)


class Model(Backbone, kw_only=True):
    """Inputs [batch, 2 * length]: document 1 then document 2 (0 = padding); ``max_length`` is per document."""

    vocab_size: int
    num_classes: int
    max_length: int = 4000
    pooling: str = "cls"
    interaction: str = "nli"

    def setup(self):
        check_pooling(self.pooling)
        check_interaction(self.interaction)
        if self.mlp_dim < 2:
            raise ValueError(f"model.mlp_dim={self.mlp_dim} must be at least 2: the head's second layer has "
                             "mlp_dim // 2 units.")
        self.trunk = Trunk(**self.backbone_fields(), vocab_size=self.vocab_size, max_length=self.max_length,
                           prefix_tokens=int(self.pooling == "cls"))
        self.head = MatchingHead(self.mlp_dim, self.num_classes)

    def encode(self, tokens, mask=None, *, deterministic=True):
        """tokens [n, length] of single documents -> pooled [n, embed]; ``mask`` defaults to ``tokens != 0``."""
        mask = tokens != 0 if mask is None else mask
        prefix = int(self.pooling == "cls")
        x, mask = self.trunk(tokens, mask=mask, deterministic=deterministic)
        return pool(x, mask[:, prefix:], self.pooling, prefix)

    def __call__(self, tokens, *, deterministic=True):
        """tokens [batch, 2 * length] int -> logits [batch, num_classes] float32."""
        batch, total = tokens.shape
        if total % 2:
            raise ValueError(f"dual_encoder inputs hold two documents of equal length, but their length {total} "
                             "is odd; use a paired source such as data 'aan'.")
        # Both documents go through the trunk as one batch of 2 * batch rows: one shared set of weights.
        pooled = self.encode(jnp.concatenate(jnp.split(tokens, 2, axis=1), axis=0), deterministic=deterministic)
        x1, x2 = pooled[:batch], pooled[batch:]
        return self.head(interaction_features(x1, x2, self.interaction))
