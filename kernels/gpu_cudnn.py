"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``: the ``"cudnn"`` backend.

``attention`` takes ``kernels.flash_attention.flash_attention``'s arguments and returns its result (dispatch op
``"attention"``). effjax's patterns map onto jax.nn's arguments (``plan`` + ``nn_arguments``, pure functions that
``tests/test_kernels_gpu_backends.py`` checks on a CPU through ``implementation="xla"``):

- ``causal`` with ``q_len == kv_len``: ``is_causal`` (cuDNN skips the upper tiles). With ``q_len != kv_len``
  effjax aligns queries to the end of the keys and jax.nn to the start, so the pattern goes into a mask.
- ``window`` under causal self-attention: ``local_window_size=(window, 0)`` (cuDNN's left sliding window). A
  two-sided window (bidirectional) is refused by jax.nn's cuDNN path, so it goes into a mask.
- key padding ``mask`` [batch, kv_len]: ``key_value_seq_lengths`` when it is concrete, a right-padded suffix and
  every row keeps a key (cuDNN's padding mask); otherwise (traced, holes, an empty row) it goes into a mask.
- ``segment_ids``: a mask (``seg_q == seg_k``); jax.nn exposes no packed-sequence offsets.
- GQA/MQA: native (kv heads dividing the query heads); ``sm_scale``: ``scale``.

"Into a mask" means one boolean [batch or 1, 1, q_len, kv_len] array that cuDNN adds as a bias: exact, but dense
(no tile is skipped) and it costs memory, so ``supports`` refuses one over ``DENSE_MASK_LIMIT`` bytes. Refused:
dropout (jax.nn has none), float32 (cuDNN takes bf16/fp16), head_dim not a multiple of 8 or over 256 (128 before
Hopper), odd lengths with a mask (cuDNN's bias backward needs even ones), interpret mode, a non-CUDA platform.
``blocks``, ``num_warps`` and ``num_stages`` (effjax's kernel tuning) are accepted and ignored.

The helpers ``gpu_reason``, ``qkv`` and ``plan`` are shared with ``gpu_tokamax`` and ``gpu_mosaic``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from effjax.kernels.backend import guarded_reason

NAME = "cudnn"
PLATFORMS = ("gpu",)
DENSE_MASK_LIMIT = 2 * 2**30  # bytes of the boolean mask plus cuDNN's bias made from it
HALF = (jnp.float16, jnp.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Shared checks (never raise).


def gpu_reason(min_capability: tuple[int, int] | None = None, exact: tuple[int, int] | None = None,
               label: str = "") -> str | None:
    """Why the current device cannot run a CUDA kernel (None when it can): not a GPU, a ROCm GPU, or a compute
    capability below ``min_capability`` / of another major version than ``exact`` (``label`` names the
    architecture). What cannot be read (an attribute another jax version lacks) is not held against the device."""
    try:
        platform = jax.default_backend()
    except Exception as error:  # noqa: BLE001  (supports must never raise)
        return f"no JAX backend ({type(error).__name__}: {error})"
    if platform != "gpu":
        return f"needs a GPU (platform is {platform})"
    try:
        version = str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # noqa: BLE001
        version = ""
    if "rocm" in version or "hip" in version:
        return "needs CUDA (the GPU platform is ROCm)"
    have = capability()
    if have is None or (min_capability is None and exact is None):
        return None
    shown = f"{have[0]}.{have[1]}"
    if exact is not None and have[0] != exact[0]:
        return f"needs compute capability {exact[0]}.{exact[1]} ({label}); this GPU has {shown}"
    if min_capability is not None and have < min_capability:
        need = f"{min_capability[0]}.{min_capability[1]}"
        return f"needs compute capability {need} ({label}) or newer; this GPU has {shown}"
    return None


def capability() -> tuple[int, int] | None:
    """The first device's CUDA compute capability, or None off CUDA."""
    try:
        value = getattr(jax.devices()[0], "compute_capability", None)
        return None if value is None else tuple(int(x) for x in str(value).split(".")[:2])
    except Exception:  # noqa: BLE001
        return None


def qkv(call: dict):
    """``(q, k, v)`` of a call (arrays or ShapeDtypeStructs) after the shape checks every backend needs, or a
    reason string."""
    try:
        q, k, v = call["q"], call["k"], call["v"]
        shapes = [tuple(x.shape) for x in (q, k, v)]
        dtypes = [jnp.dtype(x.dtype) for x in (q, k, v)]
    except (KeyError, AttributeError, TypeError) as error:
        return f"the call has no q, k, v arrays ({type(error).__name__}: {error})"
    if any(len(s) != 4 for s in shapes):
        return f"q, k, v must be [batch, length, heads, head_dim], got {shapes}"
    if shapes[1] != shapes[2]:
        return f"k and v shapes differ: {shapes[1]} vs {shapes[2]}"
    if shapes[0][0] != shapes[1][0] or shapes[0][3] != shapes[1][3]:
        return f"q {shapes[0]} and k {shapes[1]} must agree in batch and head_dim"
    if shapes[0][2] % shapes[1][2]:
        return f"key/value heads ({shapes[1][2]}) must divide query heads ({shapes[0][2]})"
    if len(set(dtypes)) != 1:
        return f"q, k, v dtypes differ: {', '.join(d.name for d in dtypes)}"
    return q, k, v


def concrete(x):
    """``x`` as a numpy array when its values are known now (numpy or a committed jax array), else None."""
    if x is None or isinstance(x, jax.ShapeDtypeStruct | jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001  (a tracer in disguise)
        return None


def dropout_reason(call: dict, who: str) -> str | None:
    rate = call.get("dropout_rate") or 0.0
    try:
        return f"dropout ({who} has no attention dropout)" if float(rate) > 0.0 else None
    except TypeError:  # a traced rate
        return f"dropout ({who} has no attention dropout)"


# ----------------------------------------------------------------------------------------------------
# effjax's pattern -> jax.nn.dot_product_attention's arguments (pure; also tokamax's, whose API is jax.nn's).


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one effjax attention call maps onto jax.nn-style arguments.

    ``is_causal`` / ``local_window``: native causal and (left, right) window; ``kv_lengths``: int32 [batch] for
    ``key_value_seq_lengths`` (or None); ``dense``: the features that need the boolean mask (empty: none);
    ``mask_batch``: the mask's leading dimension (batch when it holds per-row padding or segments, else 1).
    """

    is_causal: bool
    local_window: tuple[int, int] | None
    kv_lengths: np.ndarray | None = dataclasses.field(compare=False)
    dense: tuple[str, ...]
    mask_batch: int

    def dense_bytes(self, q_len: int, kv_len: int, itemsize: int, full_rows: bool) -> int:
        """Bytes of the boolean mask plus a bias of ``itemsize`` made from it (``full_rows``: broadcast to q_len)."""
        if not self.dense:
            return 0
        rows = q_len if (full_rows or set(self.dense) - {"key padding"}) else 1
        return self.mask_batch * rows * kv_len * (1 + itemsize)


def suffix_lengths(mask) -> np.ndarray | None:
    """int32 [batch] real-key counts when ``mask`` [batch, kv_len] is concrete, True on a prefix and False on the
    rest of each row, with at least one real key per row; else None (the pattern then needs a dense mask)."""
    values = concrete(mask)
    if values is None or values.ndim != 2:
        return None
    values = values.astype(bool)
    lengths = values.sum(-1)
    prefix = np.arange(values.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(values, prefix) or lengths.min() < 1:
        return None
    return lengths.astype(np.int32)


def plan(batch: int, q_len: int, kv_len: int, *, mask=None, segment_ids=None, causal=False, window=None,
         two_sided_window: bool = False) -> Plan:
    """The mapping of effjax's key padding, segments, causal (aligned to the end) and ``window`` (|i' - j| <=
    window, i' = i + kv_len - q_len; causal keeps [i' - window, i']). ``two_sided_window``: the implementation
    takes a (left, right) window without causal (tokamax, XLA), which cuDNN does not."""
    self_attention = q_len == kv_len
    dense = []
    is_causal = bool(causal) and self_attention
    if causal and not self_attention:
        dense.append("causal cross attention")
    local_window = None
    if window is not None:
        if self_attention and causal:
            local_window = (int(window), 0)
        elif self_attention and two_sided_window:
            local_window = (int(window), int(window))
        else:
            dense.append("window" if self_attention else "window cross attention")
    kv_lengths = None
    if mask is not None:
        kv_lengths = suffix_lengths(mask)
        if kv_lengths is None:
            dense.append("key padding")
    if segment_ids is not None:
        dense.append("segment_ids")
    per_row = any(f in dense for f in ("key padding", "segment_ids"))
    return Plan(is_causal, local_window, kv_lengths, tuple(dense), batch if per_row else 1)


def dense_mask(p: Plan, q_len: int, kv_len: int, *, mask=None, segment_ids=None, causal=False, window=None,
               full_rows: bool = False):
    """The boolean [mask_batch, 1, q_len or 1, kv_len] mask of ``p.dense`` (None when empty); ``full_rows``
    broadcasts it to q_len rows (cuDNN's bias must have them)."""
    if not p.dense:
        return None
    out = jnp.ones((1, 1, 1, kv_len), bool)
    i = jnp.arange(q_len)[:, None] + (kv_len - q_len)  # queries aligned to the end of the keys
    j = jnp.arange(kv_len)[None, :]
    if "causal cross attention" in p.dense:
        out = out & (i >= j)[None, None]
    if "window" in p.dense or "window cross attention" in p.dense:
        out = out & (jnp.abs(i - j) <= window)[None, None]
        if causal:
            out = out & (i >= j)[None, None]
    if "key padding" in p.dense:
        out = out & jnp.asarray(mask, bool)[:, None, None, :]
    if "segment_ids" in p.dense:
        seg = jnp.asarray(segment_ids)
        out = out & (seg[:, :, None] == seg[:, None, :])[:, None]
    if full_rows and out.shape[2] != q_len:
        out = jnp.broadcast_to(out, (out.shape[0], 1, q_len, kv_len))
    return out


def nn_arguments(q_len: int, kv_len: int, p: Plan, *, mask=None, segment_ids=None, causal=False, window=None,
                 full_rows: bool = False) -> dict:
    """Keyword arguments of ``jax.nn.dot_product_attention`` (and tokamax's) for plan ``p``."""
    out = {"is_causal": p.is_causal}
    if p.local_window is not None:
        out["local_window_size"] = p.local_window
    if p.kv_lengths is not None:
        out["key_value_seq_lengths"] = jnp.asarray(p.kv_lengths, jnp.int32)
    dense = dense_mask(p, q_len, kv_len, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
                       full_rows=full_rows)
    if dense is not None:
        out["mask"] = dense
    return out


# ----------------------------------------------------------------------------------------------------
# The backend.


def supports(op: str, call: dict) -> str | None:
    """None when cuDNN can run ``call`` here; else the first unsupported feature or requirement."""
    return guarded_reason(op, call, OPS, _reason)


def _reason(call: dict) -> str | None:
    arrays = qkv(call)
    if isinstance(arrays, str):
        return arrays
    q, k, _ = arrays
    dtype = jnp.dtype(q.dtype)
    if dtype not in map(jnp.dtype, HALF):
        return f"{dtype.name} (cuDNN takes bf16/fp16)"
    head_dim = q.shape[3]
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8"
    reason = dropout_reason(call, "jax.nn.dot_product_attention")
    if reason:
        return reason
    if call.get("interpret"):
        return "interpret mode (cuDNN runs compiled only)"
    reason = gpu_reason((8, 0), label="Ampere")
    if reason:
        return reason
    hopper = (capability() or (9, 0)) >= (9, 0)
    if head_dim > (256 if hopper else 128):
        return f"head_dim {head_dim} is over {256 if hopper else 128} ({'Hopper' if hopper else 'before Hopper'})"
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    window = call.get("window")
    if window is not None and window < 0:
        return f"window {window} is negative"
    p = plan(batch, q_len, kv_len, mask=call.get("mask"), segment_ids=call.get("segment_ids"),
             causal=bool(call.get("causal")), window=window)
    if p.dense:
        if q_len % 2 or kv_len % 2:
            return (f"odd lengths ({q_len}, {kv_len}) with a mask for {', '.join(p.dense)} (cuDNN's bias needs even "
                    "ones)")
        size = p.dense_bytes(q_len, kv_len, dtype.itemsize, full_rows=True)
        if size > DENSE_MASK_LIMIT:
            return (f"{', '.join(p.dense)} would need a dense [{p.mask_batch}, 1, {q_len}, {kv_len}] mask "
                    f"({size / 2**30:.1f} GiB, over {DENSE_MASK_LIMIT / 2**30:.0f} GiB)")
    return None


def attention(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, sm_scale=None, blocks=None,
              interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0, dropout_seed=None):
    """``flash_attention``'s computation on cuDNN (see the module docstring for the mapping and what is refused)."""
    del blocks, num_warps, num_stages, dropout_seed  # effjax's kernel tuning; dropout is refused below
    call = dict(q=q, k=k, v=v, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
                interpret=interpret, dropout_rate=dropout_rate)
    reason = supports("attention", call)
    if reason:
        raise NotImplementedError(f"{NAME}: cannot run this attention call: {reason}.")
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    p = plan(batch, q_len, kv_len, mask=mask, segment_ids=segment_ids, causal=causal, window=window)
    kwargs = nn_arguments(q_len, kv_len, p, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
                          full_rows=True)
    scale = float(sm_scale) if sm_scale else 1.0 / math.sqrt(head_dim)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **kwargs)


OPS = {"attention": attention}
