"""openxla/tokamax's attention kernels (``tokamax.dot_product_attention``): the ``"tokamax"`` backend, when
``import tokamax`` works (it is an optional dependency: this module imports without it, and ``supports`` then
says so).

``attention`` takes ``kernels.flash_attention.flash_attention``'s arguments (dispatch op ``"attention"``).
tokamax's API is ``jax.nn.dot_product_attention``'s (plus a list of implementations tried in order), so the
mapping is ``gpu_cudnn.plan`` / ``nn_arguments``: native causal and key-value lengths where they mean what
effjax means, a two-sided ``local_window_size`` for self-attention, and a broadcastable boolean mask for the
rest (segments, causal or a window in cross attention, key padding that is traced or has holes). Its masks
need not be dense over the query axis: a key-padding mask stays [batch, 1, 1, kv_len].

It runs tokamax's GPU kernels, ``IMPLEMENTATIONS`` in order: ``"mosaic"`` (Mosaic GPU, Hopper and newer), then
``"triton"``; each refuses what it cannot do with NotImplementedError and tokamax tries the next. ``supports``
traces the call abstractly (``jax.eval_shape``) to learn whether one of them accepts it, so a refusal carries
tokamax's own message. Refused up front: a platform other than a CUDA GPU, dropout (the API has none),
interpret mode. ``blocks``, ``num_warps`` and ``num_stages`` are ignored.
"""

import importlib
import math

import jax
import jax.numpy as jnp

from effjax.kernels.backend import guarded_reason
from effjax.kernels.gpu_cudnn import dropout_reason, gpu_reason, nn_arguments, plan, qkv

NAME = "tokamax"
PLATFORMS = ("gpu",)
IMPLEMENTATIONS = ("mosaic", "triton")


def _import():
    """(tokamax module or None, why not)."""
    try:
        return importlib.import_module("tokamax"), None
    except ModuleNotFoundError as error:
        if error.name == "tokamax":
            return None, "tokamax is not installed"
        return None, f"tokamax does not import (missing {error.name})"
    except Exception as error:  # noqa: BLE001  (a broken install, e.g. built for another jax)
        return None, f"tokamax does not import ({type(error).__name__}: {str(error)[:100]})"


def module():
    """The tokamax module, or None when it is not installed (or fails to import)."""
    return _import()[0]


def installed_reason() -> str | None:
    lib, why = _import()
    if lib is None:
        return why
    if not hasattr(lib, "dot_product_attention"):
        return f"tokamax {getattr(lib, '__version__', '?')} has no dot_product_attention"
    return None


def supports(op: str, call: dict) -> str | None:
    """None when tokamax can run ``call`` here; else why not (tokamax's own message when its kernels refuse)."""
    return guarded_reason(op, call, OPS, _reason)


def _reason(call: dict) -> str | None:
    reason = installed_reason()
    if reason:
        return reason
    arrays = qkv(call)
    if isinstance(arrays, str):
        return arrays
    reason = dropout_reason(call, "tokamax.dot_product_attention")
    if reason:
        return reason
    if call.get("interpret"):
        return "interpret mode (tokamax's GPU kernels run compiled only)"
    reason = gpu_reason()
    if reason:
        return reason
    window = call.get("window")
    if window is not None and window < 0:
        return f"window {window} is negative"
    # Whether a kernel accepts it is decided while tracing: trace it abstractly, nothing runs.
    structs = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in call.items()
               if name in ("q", "k", "v") and x is not None}
    rest = {name: x for name, x in call.items() if name not in structs and name != "grad"}
    implementation = rest.pop("implementation", None) or IMPLEMENTATIONS
    try:
        jax.eval_shape(lambda q, k, v: attention(q, k, v, implementation=implementation, **rest), structs["q"],
                       structs["k"], structs["v"])
    except (NotImplementedError, ExceptionGroup) as error:
        return _message(error, (implementation,) if isinstance(implementation, str) else tuple(implementation))
    return None


def _message(error: BaseException, implementations: tuple[str, ...]) -> str:
    """One line from tokamax's refusal: each implementation's first line, for a group."""
    if isinstance(error, ExceptionGroup) and error.exceptions:
        parts = [_message(e, ()) for e in error.exceptions]
        return "; ".join(f"{impl}: {part}" for impl, part in zip(implementations, parts, strict=False))
    line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return f"{implementations[0]}: {line}" if len(implementations) == 1 else line


def attention(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None, sm_scale=None, blocks=None,
              interpret=None, num_warps=None, num_stages=None, dropout_rate=0.0, dropout_seed=None,
              implementation=None):
    """``flash_attention``'s computation through ``tokamax.dot_product_attention`` (tried in ``implementation``
    order, default ``IMPLEMENTATIONS``; see the module docstring)."""
    del blocks, num_warps, num_stages, interpret, dropout_seed
    lib, why = _import()
    if lib is None:
        raise NotImplementedError(f"{NAME}: {why}.")
    if dropout_rate:
        raise NotImplementedError(f"{NAME}: dropout (tokamax.dot_product_attention has no attention dropout).")
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    p = plan(batch, q_len, kv_len, mask=mask, segment_ids=segment_ids, causal=causal, window=window,
             two_sided_window=True)
    kwargs = nn_arguments(q_len, kv_len, p, mask=mask, segment_ids=segment_ids, causal=causal, window=window)
    scale = float(sm_scale) if sm_scale else 1.0 / math.sqrt(head_dim)
    implementation = implementation or IMPLEMENTATIONS
    impl = implementation if isinstance(implementation, str) else tuple(implementation)
    out = lib.dot_product_attention(q, k, v, scale=scale, implementation=impl, **kwargs)
    return out.astype(q.dtype) if out.dtype != jnp.dtype(q.dtype) else out


OPS = {"attention": attention}
