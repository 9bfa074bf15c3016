"""Efficient-vDiT attention-tile sparse 3-D attention (Ding, Li, et al. 2025, arXiv:2502.06155, Sec. 3 mask)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effjax.attention import permute, softmax
from effjax.attention._capabilities import Capabilities
from effjax.attention.common import check_mask, check_qkv, dropout_kwargs, refuse_causal, refuse_cross
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

NAME = "attention_tile"
CAPABILITIES = Capabilities(causal=False, mask=True, segments=True, cross=False, dropout=True, pallas=True)
MAX_TILE = 64  # largest kernel block of the "block_sparse" op (the flash kernels' default block)


def frame_length(length: int, num_frames: int, frame_len: int | None) -> int:
    """Tokens per frame: ``frame_len`` if given, else length / num_frames; ValueError naming the method."""
    if frame_len is None:
        if not isinstance(num_frames, int) or num_frames < 1 or length % num_frames:
            raise ValueError(f"{NAME}: sequence length {length} is not divisible by num_frames {num_frames!r}.")
        return length // num_frames
    if not isinstance(frame_len, int) or frame_len < 1 or length % frame_len:
        raise ValueError(f"{NAME}: sequence length {length} is not a multiple of frame_len {frame_len!r}.")
    return frame_len


def frame_layout(frames: int, num_global: int) -> np.ndarray:
    """numpy bool [frames, frames]: query frame i sees key frame j iff i == j, j < a or i < a (a = num_global)."""
    i = np.arange(frames)
    return (i[:, None] == i[None, :]) | (i[None, :] < num_global) | (i[:, None] < num_global)


def _kernel_call(q, k, v, *, mask, segment_ids, frame, num_global, dropout_rate, dropout_rng) -> dict:
    """The tile mask as a block layout for the "block_sparse" op (no copies of the global frames), at a block of
    the largest power of two dividing the frame, at most MAX_TILE."""
    batch, length = q.shape[:2]
    block = min(frame & -frame, MAX_TILE)
    per_frame = frame // block
    layout = np.repeat(np.repeat(frame_layout(length // frame, num_global), per_frame, 0), per_frame, 1)
    return dict(q=q, k=k, v=v, block_mask=layout, block_size=block, mask=check_mask(NAME, mask, batch, length),
                segment_ids=segment_ids, **softmax.kernel_dropout(dropout_rate, dropout_rng))


def attend(q, k, v, *, mask=None, segment_ids=None, causal=False, num_frames=8, frame_len=None,
           num_global_frames=1, dropout_rate=0.0, dropout_rng=None, impl="xla"):
    """Softmax over the attention tiles kept by the mask "MLCD a:b" with a = ``num_global_frames``.

    The sequence is T frames of ``frame_len`` tokens (``frame_len`` wins over ``num_frames``). Query frame i
    sees key frame j iff i == j, j < a (global reference frames) or i < a (reference frames see everything).
    Cost O(T a F^2 d) instead of O((T F)^2 d): a global query frame attends to all keys, any other frame to
    the a global frames plus itself. Padded keys are excluded; ``segment_ids`` restrict further.
    Self-attention only. Other ``impl`` (``kernels.dispatch``, op "block_sparse"), e.g. "pallas": the block-sparse
    kernel over ``frame_layout`` at a block of the largest power of two dividing the frame length, at most 64
    (Triton's compiled kernels refuse one below 16; interpret mode takes any); dropout with the kernel's own
    draws, head_dim a power of two.
    A query with no allowed key gets the mean of the values it may see on both paths (all keys for a global
    frame, else the global frames and its own).
    """
    check_qkv(NAME, q, k, v)
    check_impl(NAME, impl)
    refuse_causal(NAME, causal, "reference frames attend to every frame, and frames attend to whole tiles.")
    refuse_cross(NAME, q, k, "tiles pair frames of one sequence.")
    batch, length = q.shape[:2]
    frame = frame_length(length, num_frames, frame_len)
    frames = length // frame
    if not isinstance(num_global_frames, int) or num_global_frames < 0:
        raise ValueError(f"{NAME}: num_global_frames must be an int >= 0, got {num_global_frames!r}.")
    a = min(num_global_frames, frames)
    xla = functools.partial(_attend_xla, q, k, v, mask=mask, segment_ids=segment_ids, frame=frame, num_global=a,
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "xla":
        return xla()
    call = _kernel_call(q, k, v, mask=mask, segment_ids=segment_ids, frame=frame, num_global=a,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return dispatch.run("block_sparse", impl, call, xla=xla, where=NAME)


def _attend_xla(q, k, v, *, mask, segment_ids, frame, num_global, dropout_rate, dropout_rng):
    batch, length = q.shape[:2]
    frames, a = length // frame, num_global
    global_len = a * frame
    mask = jnp.ones((batch, length), bool) if mask is None else jnp.asarray(mask, bool)
    segments = None if segment_ids is None else jnp.asarray(segment_ids)
    keys = dropout_rng if dropout_rng is None else jax.random.split(dropout_rng)
    outputs = []
    if a:  # global query frames: one group holding every key
        outputs.append(permute.softmax_in_groups(
            q[:, None, :global_len], k[:, None], v[:, None], key_mask=mask[:, None],
            query_segments=None if segments is None else segments[:, None, :global_len],
            key_segments=None if segments is None else segments[:, None],
            dropout_rate=dropout_rate, dropout_rng=None if keys is None else keys[0])[:, 0])
    if a < frames:  # every other frame: its own tile plus the global frames' tiles
        local = frames - a

        def tiles(x):
            own = x[:, global_len:].reshape((batch, local, frame) + x.shape[2:])
            shared = jnp.broadcast_to(x[:, None, :global_len], (batch, local, global_len) + x.shape[2:])
            return own, jnp.concatenate([shared, own], axis=2)

        q_own, _ = tiles(q)
        _, k_seen = tiles(k)
        _, v_seen = tiles(v)
        _, mask_seen = tiles(mask)
        seg_own, seg_seen = (None, None) if segments is None else tiles(segments)
        out = permute.softmax_in_groups(q_own, k_seen, v_seen, key_mask=mask_seen, query_segments=seg_own,
                                        key_segments=seg_seen, dropout_rate=dropout_rate,
                                        dropout_rng=None if keys is None else keys[1])
        outputs.append(out.reshape((batch, local * frame) + out.shape[3:]))
    return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


class Attention(nn.Module):
    """Linen wrapper of ``attend``.

    Defaults: ``num_frames=8`` (T = 8 latent frames for 29-frame Open-Sora-Plan clips in the paper's Table 1)
    and ``num_global_frames=1`` (the sparsest mask, 1:7, of that table). The paper searches the mask per layer;
    set the fields per layer to follow a searched schedule. ``frame_len`` (tokens per frame) overrides
    ``num_frames`` when set.
    """

    num_frames: int = 8
    frame_len: int | None = None
    num_global_frames: int = 1
    dropout_rate: float = 0.0
    impl: str = "xla"  # "pallas": the block-sparse kernel over the kept tiles

    @nn.compact
    def __call__(self, q, k, v, *, mask=None, segment_ids=None, causal=False, deterministic=True):
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, num_frames=self.num_frames,
                      frame_len=self.frame_len, num_global_frames=self.num_global_frames,
                      impl=self.impl, **dropout_kwargs(self, deterministic))
