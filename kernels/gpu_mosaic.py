"""JAX's Mosaic GPU FlashAttention-3 kernel (``jax.experimental.pallas.ops.gpu.attention_mgpu``): the ``"mosaic_gpu"``
backend, Hopper only.

``attention`` takes ``kernels.flash_attention.flash_attention``'s arguments (dispatch op ``"attention"``). What
the shipped kernel does, read from its source (jax 0.12): warp-specialised wgmma forward (two compute
warpgroups of ``block_q`` rows each and one TMA warpgroup), a backward (dQ and dK/dV kernels) for bidirectional
attention only, GQA/MQA (kv heads dividing the query heads), float16 (its shared-memory tiles are declared
float16, so bfloat16 inputs fail to lower: refused), ``head_dim`` a multiple of 64,
``q_len`` a multiple of 2 * block_q, ``kv_len`` a multiple of block_kv, causal aligned to the start (so
self-attention only here). It has no logit scale (we scale q first: one extra rounding of q), no masks, no
segments, no window, no dropout, and its causal path has no backward. It lowers for CUDA from a CPU (an abstract
H100 device; ``tests/test_kernels_gpu_backends.py``).

``supports`` refuses everything else with the reason. Causal calls are refused unless the call says
``grad=False`` (a forward-only call, e.g. inference or a forward benchmark): the kernel would otherwise fail only
when differentiated, far from the choice. ``blocks``, ``num_warps`` and ``num_stages`` are ignored; the tuning is
``tuning()``.
"""

import math

import jax
import jax.numpy as jnp

from effjax.kernels.backend import guarded_reason
from effjax.kernels.gpu_cudnn import HALF, concrete, dropout_reason, gpu_reason, qkv

NAME = "mosaic_gpu"
PLATFORMS = ("gpu",)
BLOCK_Q = 64  # rows per compute warpgroup; two warpgroups per program, so q_len must divide by 128
BACKWARD_BLOCK = 64


def tuning(kv_len: int, head_dim: int, causal: bool):
    """``attention_mgpu.TuningConfig`` for these sizes: 64-row query blocks; 128-key blocks where the length and
    shared memory allow (head_dim 256 takes 64: two stages of 128 x 256 K and V tiles exceed Hopper's 227 KiB);
    64 x 64 backward blocks."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    block_kv = 128 if kv_len % 128 == 0 and head_dim <= 128 else 64
    backward = {} if causal else dict(block_q_dkv=BACKWARD_BLOCK, block_kv_dkv=BACKWARD_BLOCK,
                                      block_q_dq=BACKWARD_BLOCK, block_kv_dq=BACKWARD_BLOCK)
    return attention_mgpu.TuningConfig(block_q=BLOCK_Q, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                                       **backward)


def supports(op: str, call: dict) -> str | None:
    """None when attention_mgpu can run ``call`` here; else the first unsupported feature or requirement."""
    return guarded_reason(op, call, OPS, _reason)


def _reason(call: dict) -> str | None:
    arrays = qkv(call)
    if isinstance(arrays, str):
        return arrays
    q, k, _ = arrays
    dtype = jnp.dtype(q.dtype)
    if dtype not in map(jnp.dtype, HALF):
        return f"{dtype.name} (attention_mgpu takes fp16)"
    if dtype == jnp.bfloat16:  # its shared-memory tiles are declared float16: bf16 fails to lower
        return f"bfloat16 (attention_mgpu in jax {jax.__version__} keeps its tiles in float16; pass float16)"
    head_dim, q_len, kv_len = q.shape[3], q.shape[1], k.shape[1]
    if head_dim % 64:
        return f"head_dim {head_dim} is not a multiple of 64"
    if head_dim > 256:
        return f"head_dim {head_dim} is over 256 (shared memory)"
    for name in ("mask", "segment_ids", "window"):
        if call.get(name) is not None:
            if name == "mask":
                values = concrete(call[name])
                if values is not None and values.all():
                    continue  # an all-True key mask is no mask
            return f"{name.replace('_', ' ') if name != 'mask' else 'key padding'} (attention_mgpu takes none)"
    reason = dropout_reason(call, "attention_mgpu")
    if reason:
        return reason
    if call.get("causal"):
        if q_len != kv_len:
            return "causal cross attention (attention_mgpu aligns causal to the start)"
        if call.get("grad", True):
            return "causal backward (attention_mgpu differentiates bidirectional attention only; pass grad=False " \
                   "for a forward-only call)"
    if q_len % (2 * BLOCK_Q):
        return f"q_len {q_len} is not a multiple of {2 * BLOCK_Q}"
    if kv_len % BACKWARD_BLOCK:
        return f"kv_len {kv_len} is not a multiple of {BACKWARD_BLOCK}"
    if call.get("interpret"):
        return "interpret mode (Mosaic GPU runs compiled only)"
    return gpu_reason(exact=(9, 0), label="Hopper: wgmma")


def attention(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, sm_scale=None, blocks=None,
              interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0, dropout_seed=None, grad=None):
    """``flash_attention``'s computation on attention_mgpu (see the module docstring for what it takes)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    del blocks, num_warps, num_stages, dropout_seed  # effjax's kernel tuning; dropout is refused below
    call = dict(q=q, k=k, v=v, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
                interpret=interpret, dropout_rate=dropout_rate, grad=True if grad is None else grad)
    reason = supports("attention", call)
    if reason:
        raise NotImplementedError(f"{NAME}: cannot run this attention call: {reason}.")
    scale = float(sm_scale) if sm_scale else 1.0 / math.sqrt(q.shape[3])
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel computes softmax(q k^T) unscaled
    return attention_mgpu.attention(q, k, v, tuning(k.shape[1], q.shape[3], bool(causal)))


OPS = {"attention": attention}
