"""Position encodings of the token models (``model.position``), as pure functions.

* ``learned``: a trained table added to the embeddings (``Trunk``'s ``pos_embed``; LRA's default).
* ``sinusoid``: the fixed table of Vaswani et al. 2017, Sec. 3.5, added to the embeddings (LRA's Pathfinder):
  ``PE[pos, 2i] = sin(pos / base^(2i/d))``, ``PE[pos, 2i+1] = cos(pos / base^(2i/d))``, interleaved as in the
  paper (LRA's code concatenates the sin and cos halves instead: the same table up to a fixed channel order).
* ``rotary``: RoFormer (Su et al. 2021, Eq. 34): q and k of every attention layer rotated by position, so that
  ``q_m . k_n`` depends on ``m - n`` only. Layout: half-split (GPT-NeoX), channel ``i`` pairs with ``i + d/2``.
* ``none``: no position information (a permutation-invariant encoder under mean pooling).
"""

import jax.numpy as jnp
import numpy as np

POSITIONS = ("learned", "sinusoid", "rotary", "none")
ADDITIVE = ("learned", "sinusoid")  # the ones added to the embeddings (the others add nothing there)
BASE = 10_000.0


def check_position(position: str) -> None:
    """ValueError naming the valid values when ``position`` is not one of ``POSITIONS``."""
    if position not in POSITIONS:
        raise ValueError(f"model.position must be one of {', '.join(POSITIONS)}, got {position!r}.")


def sinusoid_table(length: int, dim: int, base: float = BASE) -> np.ndarray:
    """The fixed ``[length, dim]`` float32 table of Vaswani et al. 2017, Sec. 3.5 (odd ``dim``: last sin kept)."""
    pairs = (dim + 1) // 2
    angles = np.arange(length, dtype=np.float64)[:, None] / base ** (2 * np.arange(pairs) / dim)
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(length, 2 * pairs)
    return table[:, :dim].astype(np.float32)


def sinusoid_rows(positions, dim: int, base: float = BASE):
    """Rows ``positions`` (int of any shape, traced) of ``sinusoid_table``, float32 ``[*positions.shape, dim]``
    (decoding steps and extends)."""
    pairs = (dim + 1) // 2
    positions = jnp.asarray(positions, jnp.float32)
    angles = positions[..., None] / base ** (2 * jnp.arange(pairs, dtype=jnp.float32) / dim)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, 2 * pairs)[..., :dim]


def rotary_angles(positions, head_dim: int, base: float = BASE):
    """``[..., head_dim // 2]`` float32 angles ``pos * theta_i`` with ``theta_i = base^(-2i/head_dim)`` (Eq. 15)."""
    if head_dim % 2:
        raise ValueError(f"model.position='rotary' rotates channel pairs: the head dim (embed_dim / num_heads) must "
                         f"be even, got {head_dim}; change model.embed_dim or model.num_heads.")
    theta = base ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2 / head_dim)
    return jnp.asarray(positions, jnp.float32)[..., None] * theta


def apply_rotary(x, positions=None, base: float = BASE):
    """``x [batch, length, heads, head_dim]`` rotated by position (RoFormer Eq. 34, half-split layout).

    ``positions`` ([length] or [batch, length]) defaults to the token index ``0..length-1``; packed segments are
    not restarted (the rotation is relative, so a constant offset within a segment changes no score).
    Computed in float32, returned in ``x``'s dtype.
    """
    length, head_dim = x.shape[1], x.shape[-1]
    if positions is None:
        positions = jnp.arange(length)
    angles = rotary_angles(positions, head_dim, base)
    angles = angles[None, :, None] if angles.ndim == 2 else angles[:, :, None]  # -> [batch|1, length, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return rotated.astype(x.dtype)
