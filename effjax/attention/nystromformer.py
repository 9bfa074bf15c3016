"""Nystromformer (Xiong et al. 2021, Sec. 3, Nystrom form): softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout, dropout_kwargs

NAME = "nystromformer"
CAPABILITIES = Capabilities(
    causal=False, mask=True, segments=False, cross=False, dropout=True, pallas=False,
    notes="cross attention works with conv_kernel_size=0; the default conv skip adds conv(v) at the query positions.",
)
_NEG = jnp.finfo(jnp.float32).min


def _refuse(segment_ids, causal):
    if causal:
        raise NotImplementedError(
            f"{NAME}: causal=True is not supported: every landmark is a mean over a whole segment of "
            "keys and queries, so each output would read future tokens.")
    if segment_ids is not None:
        raise NotImplementedError(
            f"{NAME}: segment_ids are not supported: landmarks average tokens across segment boundaries.")


def iterative_pinv(mat, iterations=6):
    """Moore-Penrose pseudo-inverse of [..., m, m] by the paper's iteration (Razavi et al. 2014).

    Z_0 = A^T / (||A||_1 ||A||_inf) per matrix; Z <- Z/4 (13 I - A Z (15 I - A Z (7 I - A Z))).
    """
    eye = jnp.eye(mat.shape[-1], dtype=mat.dtype)
    norm_1 = jnp.max(jnp.sum(jnp.abs(mat), axis=-2), axis=-1)
    norm_inf = jnp.max(jnp.sum(jnp.abs(mat), axis=-1), axis=-1)
    z = jnp.swapaxes(mat, -1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        az = mat @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _segment_means(x, valid, m):
    """[b, n, h, d] with n % m == 0 -> masked means over m contiguous segments [b, m, h, d], and [b, m] any-valid."""
    b, n, h, d = x.shape
    w = valid.astype(jnp.float32).reshape(b, m, n // m)
    sums = jnp.einsum("bmsd,bms->bmd", x.reshape(b, m, n // m, h * d), w).reshape(b, m, h, d)
    count = w.sum(-1)
    return sums / jnp.maximum(count, 1.0)[:, :, None, None], count > 0


def _pad_to(x, valid, m):
    n = x.shape[1]
    extra = -n % m
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, extra)))
    return x, valid


def depthwise_conv(v, kernel):
    """Per-head conv along length of [b, n, h, d] with kernel [size, h] shared over head_dim, zero 'same' padding."""
    b, n, h, d = v.shape
    size = kernel.shape[0]
    x = jnp.transpose(v, (0, 3, 1, 2)).reshape(b * d, n, h)
    y = jax.lax.conv_general_dilated(x, kernel[:, None, :].astype(x.dtype), window_strides=(1,),
                                     padding=((size // 2, size - 1 - size // 2),),
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=h)
    return jnp.transpose(y.reshape(b, d, n, h), (0, 2, 3, 1))


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, num_landmarks=64, pinv_iterations=6,
           conv_kernel=None, dropout_rate=0.0, dropout_rng=None):
    """Nystrom approximation of softmax attention over [batch, length, heads, head_dim], in float32.

    Landmarks are means of ``num_landmarks`` contiguous segments of q and of k. A length that is not
    a multiple of ``num_landmarks`` is zero-padded at the end with positions marked padded (so the
    last landmark averages fewer tokens, and ``num_landmarks`` >= length gives one token per landmark).
    Padding (``mask`` False, and the length padding): landmarks are masked means over real tokens
    only; padded keys get -inf logits in softmax(Q~ K^T); a key landmark with no real token is
    dropped (its column is masked in softmax(Q K~^T) and softmax(Q~ K~^T), and its row in the latter
    is replaced by the unit vector, so it leaves the pseudo-inverse block-diagonal); v is zeroed at
    padded keys before the conv. In self-attention (q_len == kv_len) ``mask`` also marks which
    queries form the query landmarks, as the reference zeroes Q at padding. Padded keys therefore
    never change an output. With one real token per landmark this is exact softmax attention up to
    the convergence of the ``pinv_iterations`` Newton-Schulz-type iterations.

    ``conv_kernel`` [size, heads] adds the paper's depthwise conv skip on v (self-attention only).
    Dropout, when asked for, drops entries of softmax(Q K~^T) (the reference code has none).
    """
    check_qkv(NAME, q, k, v)
    _refuse(segment_ids, causal)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if num_landmarks < 1:
        raise ValueError(f"{NAME}: num_landmarks must be positive, got {num_landmarks}.")
    mask = check_mask(NAME, mask, batch, kv_len)
    if mask is None:
        mask = jnp.ones((batch, kv_len), bool)
    q_valid = mask if q_len == kv_len else jnp.ones((batch, q_len), bool)
    m = num_landmarks
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    v32 = jnp.where(mask[:, :, None, None], v32, 0.0)

    qp, qp_valid = _pad_to(q32, q_valid, m)
    kp, kp_valid = _pad_to(k32, mask, m)
    q_land, _ = _segment_means(qp, qp_valid, m)
    k_land, k_land_valid = _segment_means(kp, kp_valid, m)
    col_ok = k_land_valid[:, None, None, :]  # [b, 1, 1, m]

    logits_1 = jnp.einsum("bqhd,bmhd->bhqm", q32, k_land) * scale
    kernel_1 = jax.nn.softmax(jnp.where(col_ok, logits_1, _NEG), axis=-1)
    logits_2 = jnp.einsum("bihd,bjhd->bhij", q_land, k_land) * scale
    kernel_2 = jax.nn.softmax(jnp.where(col_ok, logits_2, _NEG), axis=-1)
    kernel_2 = jnp.where(k_land_valid[:, None, :, None], kernel_2, jnp.eye(m, dtype=jnp.float32))
    logits_3 = jnp.einsum("bmhd,bkhd->bhmk", q_land, k32) * scale
    kernel_3 = jax.nn.softmax(jnp.where(mask[:, None, None, :], logits_3, _NEG), axis=-1)

    kernel_1 = dropout(kernel_1, dropout_rate, dropout_rng)
    landmark_values = jnp.einsum("bhmk,bkhd->bhmd", kernel_3, v32)
    mixed = iterative_pinv(kernel_2, pinv_iterations) @ landmark_values
    out = jnp.einsum("bhqm,bhmd->bqhd", kernel_1, mixed)

    if conv_kernel is not None:
        if q_len != kv_len:
            raise NotImplementedError(
                f"{NAME}: the depthwise conv skip is not supported in cross attention: it adds conv(v) at "
                f"query positions, which needs q_len == kv_len (got {q_len} and {kv_len}); disable it.")
        if conv_kernel.ndim != 2 or conv_kernel.shape[1] != heads:
            raise ValueError(f"{NAME}: conv_kernel must have shape [size, heads={heads}], got {conv_kernel.shape}.")
        out = out + depthwise_conv(v32, conv_kernel.astype(jnp.float32))
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Linen wrapper; owns the depthwise conv kernel [conv_kernel_size, heads] when conv_kernel_size > 0.

    Defaults follow the paper: 64 landmarks, 6 pseudo-inverse iterations, conv skip of size 33
    (0 disables it; odd sizes keep it centred). The conv kernel uses PyTorch Conv2d's default init.
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel_size: int = 33
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        check_qkv(NAME, q, k, v)
        _refuse(segment_ids, causal)
        if self.conv_kernel_size < 0:
            raise ValueError(f"{NAME}: conv_kernel_size must be >= 0 (0 disables the conv), got "
                             f"{self.conv_kernel_size}.")
        conv = None
        if self.conv_kernel_size:
            init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(size))
            conv = self.param("conv_kernel", init, (self.conv_kernel_size, q.shape[2]), jnp.float32)
        return attend(q, k, v, mask=mask, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
                      conv_kernel=conv, **dropout_kwargs(self, deterministic))
