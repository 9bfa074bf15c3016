"""What a candidate model costs: parameters, compiled FLOPs, measured step latency, and decode state.

``param_count`` and ``flops_per_step`` are exact for what they measure (the param tree; XLA's own count of
the compiled step). ``step_latency`` is a wall-clock median on the machine it runs on. Constraint checks in a
search (HAT, mixFormer) use all three.

``decode_state_bytes_per_token(model_fields, context_length)`` is an analytic estimate of the memory a
generating decoder keeps per layer, summed over layers and divided by the context length: the bytes of decode
state held at ``context_length`` tokens, per token of that context. A softmax layer's KV cache grows with the
context, so its cost per token is constant (``2 * heads * head_dim * dtype_bytes``); a fixed-size recurrent
state costs ``state_bytes / context_length``, which falls as the context grows; a window caches at most its
window. Each method's state is one row of ``DECODE_STATE`` (H heads of width D, its own params with the paper
defaults where unset; L the context length):

  ======================  ==========================================================================
  softmax, packed         KV cache: 2HD per token (packing changes which keys a query sees, not the cache)
  probsparse              KV cache: the sampled keys and the lazy queries' running mean read every earlier key
  kernelized_rpe          KV cache: the RPE weight c(i - j) re-weights every past pair, so no fixed-size state;
                          k and v are cached (features recomputed), 2HD per token
  primer_mdha             KV cache of the convolved k, v (2HD per token) + the last 2 raw q, k, v for the
                          width-3 causal depthwise convs (6HD, fixed)
  shvit_single_head       KV cache of one head: the q/k slice width + the attended value width per token
                          (``shvit_single_head.slice_widths``); the passthrough channels need nothing
  hyena                   the long-conv input u = v'k' of every past token (HD per token; the implicit filter
                          spans the whole sequence) + the short-filter taps (3HD(short_filter_order - 1), fixed).
                          A distilled recurrence (Laughing Hyena) would be fixed-size; effjax has none
  sliding_window          KV of keys [i - window, i]: min(window + 1, L) tokens
  longformer              KV of the window and the global tokens: min(window + 1 + num_global, L) tokens
  block_local             KV of the current block: min(block_size, L) tokens (the worst case within a block)
  scatterbrain            KV of the causal band (keys [i - window // 2, i]: min(window // 2 + 1, L) tokens) +
                          the Performer prefix sums, H(m(D + 1) + 1) with m = floor(D ln D), doubled when
                          ``hyperbolic`` (the +1: the running max of the key scale)
  linear_elu              recurrent: sum phi(k) v^T and sum phi(k), H(D^2 + D)
  cosformer               recurrent: the sin and cos halves of the same sums, H(2D^2 + 2D) (needs a fixed
                          ``max_len`` M to decode)
  performer               recurrent: H(mD + m + 1), m = num_features (the +1: the running max of the key
                          scale that keeps exp features finite)
  performer_relu          recurrent: H(mD + m), m = num_features, or m = D when ``random_features=False``
  mamba                   recurrent: the SSM state HD * d_state + the conv taps' history HD(d_conv - 1)
  ======================  ==========================================================================

A method not in the table (one added after this file) is costed as a full KV cache, and the row
``decode_state_layers`` returns for it says so. Only methods that can be causal belong here; the table was
written against effjax's causal methods as of this file and is checked by ``tests/test_search_nas.py``.
The estimate leaves out what every layer shares (activations of the current token, the parameters).
"""

import math
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from effjax import attention as attention_lib
from effjax.models import layer_attention


def param_count(params) -> int:
    """The number of scalars in a param tree (arrays or ``jax.ShapeDtypeStruct`` leaves, e.g. from
    ``jax.eval_shape``); frozen params such as random projections count too."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def flops_per_step(fn: Callable, *args) -> float:
    """XLA's FLOP count of ``jax.jit(fn)(*args)`` as compiled for the default backend (``cost_analysis``).

    jax returns a dict, older versions a list with one dict per compiled module, whose counts are summed.
    RuntimeError when the backend reports no ``flops``.
    """
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    counts = [entry["flops"] for entry in analysis or () if entry and "flops" in entry]
    if not counts:
        raise RuntimeError(f"cost_analysis() of this step on backend {jax.default_backend()!r} reports no "
                           f"'flops' (got {analysis!r}); FLOPs cannot be a constraint here.")
    return float(sum(counts))


def step_latency(fn: Callable, *args, repeats: int = 10, warmup: int = 1) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls (compilation), each call
    timed until its results are ready (``jax.block_until_ready``). Pass a jitted ``fn`` to time compiled code."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"step_latency needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Each rule maps (params, heads H, head_dim D, context L) to (cached tokens, scalars per cached token, fixed
# scalars) of one layer; ``note`` says why. See the module docstring's table.
def _kv(p, h, d, n):
    return n, 2 * h * d, 0


def _window(tokens):
    return lambda p, h, d, n: (min(tokens(p), n), 2 * h * d, 0)


def _shvit(p, h, d, n):
    from effjax.attention import shvit_single_head
    width_qk, width_v = shvit_single_head.slice_widths(h * d, p["partial_ratio"], p["qk_dim"])
    return n, width_qk + width_v, 0


def _scatterbrain(p, h, d, n):
    from effjax.attention import scatterbrain
    rows = p["num_features"] or scatterbrain.default_num_features(d)
    m = 2 * rows if p["hyperbolic"] else rows
    return min(p["window"] // 2 + 1, n), 2 * h * d, h * (m * (d + 1) + 1)


def _performer_relu(p, h, d, n):
    m = p["num_features"] if p["random_features"] else d
    return 0, 0, h * (m * d + m)


DECODE_STATE = {
    "softmax": (_kv, "KV cache"),
    "packed": (_kv, "KV cache (segments restrict the keys, not the cache)"),
    "probsparse": (_kv, "KV cache (sampled keys and the running mean read every earlier key)"),
    "kernelized_rpe": (_kv, "KV cache (the RPE weight of every past pair leaves no fixed-size state)"),
    "primer_mdha": (lambda p, h, d, n: (n, 2 * h * d, 6 * h * d), "KV cache + the width-3 convs' last 2 q, k, v"),
    "shvit_single_head": (_shvit, "KV cache of the single head's q/k and value slices"),
    "hyena": (lambda p, h, d, n: (n, h * d, 3 * h * d * (p["short_filter_order"] - 1)),
              "history of the long-conv input u + the short-filter taps"),
    "sliding_window": (_window(lambda p: p["window"] + 1), "KV of keys [i - window, i]"),
    "longformer": (_window(lambda p: p["window"] + 1 + p["num_global"]), "KV of the window + global tokens"),
    "block_local": (_window(lambda p: p["block_size"]), "KV of the current block (worst case)"),
    "scatterbrain": (_scatterbrain, "KV of the causal band + Performer prefix sums"),
    "linear_elu": (lambda p, h, d, n: (0, 0, h * (d * d + d)), "recurrent: sum phi(k) v^T, sum phi(k)"),
    "cosformer": (lambda p, h, d, n: (0, 0, h * (2 * d * d + 2 * d)), "recurrent: sin and cos halves of the sums"),
    "performer": (lambda p, h, d, n: (0, 0, h * (p["num_features"] * (d + 1) + 1)),
                  "recurrent: feature sums + the key-scale running max"),
    "performer_relu": (_performer_relu, "recurrent: feature sums"),
    "mamba": (lambda p, h, d, n: (0, 0, h * d * (p["d_state"] + p["d_conv"] - 1)),
              "recurrent: SSM state + conv history"),
}
UNCLASSIFIED = "not in costs.DECODE_STATE: assumed a full KV cache"


def _field(fields, key, default):
    return fields[key] if key in fields else default


def decode_state_layers(model_fields, context_length: int, dtype_bytes: int = 4) -> list[dict]:
    """One row per layer: ``{"method", "bytes_per_token", "state_bytes", "note"}`` at ``context_length``.

    ``model_fields`` is a decoder's model fields (a dict or ``config.model``): ``embed_dim``, ``num_heads``
    (the ``Backbone`` defaults 512 and 8 where absent) and the attention fields ``layer_attention.resolve``
    reads (per-layer methods, ``full_attention_layers``, ``attention_params``).
    """
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}.")
    embed_dim, heads = _field(model_fields, "embed_dim", 512), _field(model_fields, "num_heads", 8)
    if embed_dim % heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {heads}.")
    head_dim = embed_dim // heads
    rows = []
    for method, params in layer_attention.resolve(model_fields):
        rule, note = DECODE_STATE.get(method, (_kv, UNCLASSIFIED))
        params = {**attention_lib.defaults(method), **params}
        tokens, per_token, fixed = rule(params, heads, head_dim, context_length)
        state = (tokens * per_token + fixed) * dtype_bytes
        rows.append({"method": method, "bytes_per_token": state / context_length, "state_bytes": state,
                     "note": note})
    return rows


def decode_state_bytes_per_token(model_fields, context_length: int, dtype_bytes: int = 4) -> float:
    """Decode state in bytes per token of a ``context_length`` context, summed over layers
    (``decode_state_layers``; the module docstring has each method's rule)."""
    return float(sum(row["bytes_per_token"] for row in decode_state_layers(model_fields, context_length,
                                                                           dtype_bytes)))
