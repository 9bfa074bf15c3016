"""effjax's own Pallas kernels lowered through Triton (the ``"triton"`` backend of ``dispatch``).

The kernels are the modules beside this one (flash, block-sparse, chunked linear attention, selective scan, the
chunked delta rule); on a CPU they run interpreted, which is how CI tests them. ``supports`` runs each kernel's own
input checks, so a refusal carries the kernel's one-line reason (a head_dim that is not a power of two, a dtype, a
chunk size).
"""

import jax
import numpy as np

from effjax.kernels import block_sparse, delta_rule, flash_attention, linear_attention, selective_scan
from effjax.kernels.backend import interpret_default

NAME = "triton"
PLATFORMS = ("gpu", "cpu")  # cpu: interpreted
OPS = {
    "attention": flash_attention.flash_attention,
    "block_sparse": block_sparse.block_sparse_attention,
    "window_global": block_sparse.window_global_attention,
    "linear": linear_attention.chunked_linear_attention,
    "scan": selective_scan.selective_scan,
    "delta": delta_rule.chunked_delta_rule,
}


def _first_line(error: Exception) -> str:
    return str(error).split("\n")[0].removeprefix(f"{NAME}: ")


def supports(op: str, call: dict) -> str | None:
    platform = jax.default_backend()
    if platform not in PLATFORMS:
        return f"Triton runs on GPUs (platform is {platform})"
    interpret = interpret_default(call.get("interpret"))
    try:
        if op in ("attention", "block_sparse", "window_global"):
            flash_attention.check_inputs(NAME, call["q"], call["k"], call["v"], interpret)
            blocks = call.get("block_size")
            if op == "block_sparse":
                sizes = np.atleast_1d(blocks)
                if any(b & (b - 1) for b in sizes):
                    return f"block_size must be a power of two, got {blocks}"
                if not interpret and min(sizes) < 16:
                    return f"block_size {blocks} is below the compiled kernels' minimum of 16"
        elif op == "linear":
            linear_attention.check_dtype(NAME, "v", call["v"])
            if call.get("segment_ids") is not None and not call.get("causal"):
                return "segment_ids need causal=True (the state resets at each segment start)"
            if (call.get("initial_state") is not None or call.get("return_state")) and not call.get("causal"):
                return "initial_state / return_state need causal=True"
            for label, size in (("feature dim", call["phi_q"].shape[-1]), ("value dim", call["v"].shape[-1])):
                padded = linear_attention.next_power_of_2(size)
                if padded > linear_attention.MAX_DIM and not (label == "value dim" and call.get("block_v")):
                    return f"{label} {size} pads to {padded} > {linear_attention.MAX_DIM} (the state per program)"
        elif op == "delta":
            if not interpret and platform != "gpu":
                return f"compiled Triton kernels need a GPU (platform is {platform}; or interpret=True)"
            return delta_rule.call_reason(delta_rule.check, call)
        elif op not in OPS:
            return f"no {op} kernel"
    except (ValueError, KeyError) as error:
        return _first_line(error)
    return None
