"""HoT: Hourglass Tokenizer (Li et al., CVPR 2024, "Hourglass Tokenizer for Efficient Transformer-Based 3D
Human Pose Estimation"), Sec. 3: Token Pruning Cluster (TPC) and Token Recovering Attention (TRA).

TPC (``dpc_knn``, the ``Reducer``, place 'block'): the tokens' features are clustered by density peaks with
k nearest neighbours (DPC-kNN, k = 2): distances ``d_ij = ||x_i - x_j|| / sqrt(C)``; local density
``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)``, where the k nearest include the token itself at distance 0 (as the
TCFormer-derived reference code's top-k over the distance matrix does); distance to a denser token
``delta_i = min_{j: rho_j > rho_i} d_ij`` (the densest token gets the largest distance in its example); score
``gamma_i = rho_i delta_i``. The ``f'`` tokens of largest score are the cluster centres and are kept, sorted by
position (time); the cluster members are not averaged in (pruning to representative tokens, as HoT does). A
learnable position embedding of length ``f'`` (zero-initialised here) is added to the kept tokens
(``pos_embed``). Differences from the reference: HoT averages the ``[frames, joints]`` pose tokens over joints
to get one feature per frame and keeps all joints of the centre frames; effjax's tokens are already one per
position, so the token features are clustered directly. Ties in density are broken by position (an earlier
token counts as denser) instead of the reference's 1e-6 uniform noise, so the selection is deterministic. Prefix
tokens (HoT has none) are never clustered and stay first; padded tokens (``TokenState.mask``) are left out of
the clustering.

TRA (``Recover``): learnable full-length queries ``Q [F, C]`` (zero-initialised, per position rather than per
joint) attend to the pruned tokens through one multi-head cross-attention with separate q/k/v projections:
``x_full = Q + CrossAttn(Q, K = V = x_pruned)``, for dense (per-frame) outputs. A LayerNorm on the keys/values
is an effjax choice ([mem]: the reference's normalisation placement is not verified); the queries are not
normalised (a zero vector has no LayerNorm direction). Defaults in HoT: MixSTE F = 243, f' = 81 at layer 3.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.tokens import state as state_lib
from effjax.tokens._pruning import LOWEST, CrossAttention
from effjax.tokens._spec import Spec

SPEC = Spec(place="block", merges=False, needs=(), learned=True, min_prefix=0, max_prefix=2,
            notes="DPC-kNN (k=2) on the token features, keeps the f' centres sorted by position plus a learned "
                  "position embedding; ties broken by position instead of noise; Recover is the TRA "
                  "cross-attention with learnable full-length queries.")


def distances(features):
    """``[batch, n, n]`` Euclidean distances of ``features [batch, n, C]`` divided by ``sqrt(C)`` (float32)."""
    f = features.astype(jnp.float32)
    sq = jnp.sum(f * f, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * jnp.einsum("bic,bjc->bij", f, f)
    n = f.shape[1]
    d2 = jnp.where(jnp.eye(n, dtype=bool), 0.0, jnp.maximum(d2, 0.0))
    return jnp.sqrt(d2) / jnp.sqrt(jnp.float32(f.shape[-1]))


def dpc_knn_scores(features, k: int = 2, mask=None):
    """DPC-kNN ``(score, density, delta)``, each ``[batch, n]``, of ``features [batch, n, C]`` (see the module
    doc); ``mask [batch, n]`` (True = real) leaves padding out: it is nobody's neighbour or denser token, and
    its own score is -1e30."""
    d = distances(jax.lax.stop_gradient(features))
    n = d.shape[1]
    real = jnp.ones(d.shape[:2], bool) if mask is None else mask.astype(bool)
    pair = real[:, :, None] & real[:, None, :]
    far = jnp.max(jnp.where(pair, d, 0.0), axis=(1, 2))[:, None, None]
    apart = jnp.where(real[:, None, :], d, jnp.inf)  # padding is no one's neighbour
    nearest = -jax.lax.top_k(-apart, min(k, n))[0]  # [batch, n, k], the token itself first
    density = jnp.exp(-jnp.mean(jnp.square(jnp.minimum(nearest, far)), axis=-1))
    index = jnp.arange(n)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])[None])
    delta = jnp.min(jnp.where(denser & real[:, None, :], d, far), axis=-1)
    score = jnp.where(real, density * delta, LOWEST)
    return score, density, delta


def dpc_knn(features, num_centres: int, k: int = 2, mask=None):
    """Positions ``[batch, num_centres]`` (ascending) of the DPC-kNN cluster centres of ``features [batch, n,
    C]``; ``mask [batch, n]`` (True = real) leaves padding out of the clustering."""
    score = dpc_knn_scores(features, k, mask)[0]
    return jnp.sort(jax.lax.top_k(score, num_centres)[1], axis=-1).astype(jnp.int32)


def prune_cluster(x, tokens: state_lib.TokenState, keep: int, prefix: int = 0, k: int = 2):
    """TPC: keeps the prefix tokens and the ``keep - prefix`` DPC-kNN centres of the rest, in position order."""
    if keep >= x.shape[1]:
        return x, tokens
    mask = None if tokens.mask is None else tokens.mask[:, prefix:]
    centres = dpc_knn(x[:, prefix:], keep - prefix, k, mask) + prefix
    head = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (x.shape[0], prefix))
    return state_lib.gather(x, tokens, jnp.concatenate([head, centres], axis=1))


class Reducer(nn.Module):
    """HoT's Token Pruning Cluster before a block: the DPC-kNN centres, sorted by position, plus a learned
    position embedding of the kept length."""

    k: int = 2
    pos_embed: bool = True

    @nn.compact
    def __call__(self, x, tokens, stats, *, keep: int, prefix: int, deterministic: bool = True):
        if keep >= x.shape[1]:
            return x, tokens
        x, tokens = prune_cluster(x, tokens, keep, prefix, self.k)
        if not self.pos_embed:
            return x, tokens
        pos = self.param("pos_embed", nn.initializers.zeros, (keep - prefix, x.shape[-1]), jnp.float32)
        pos = jnp.concatenate([jnp.zeros((prefix, x.shape[-1]), pos.dtype), pos], axis=0)
        return x + pos[None].astype(x.dtype), tokens


class Recover(nn.Module):
    """HoT's Token Recovering Attention: ``x_pruned [batch, n', C]`` -> ``[batch, num_tokens, C]`` by learnable
    full-length queries (zero-initialised) and one cross-attention over the pruned tokens (``mask [batch, n']``
    hides padding), plus the queries as a residual."""

    num_tokens: int
    num_heads: int = 4

    @nn.compact
    def __call__(self, x_pruned, mask=None):
        width = x_pruned.shape[-1]
        queries = self.param("queries", nn.initializers.zeros, (self.num_tokens, width), jnp.float32)
        queries = jnp.broadcast_to(queries.astype(x_pruned.dtype), (x_pruned.shape[0],) + queries.shape)
        attended = CrossAttention(self.num_heads, norm_queries=False, name="attention")(queries, x_pruned, mask)
        return queries + attended.astype(x_pruned.dtype)
