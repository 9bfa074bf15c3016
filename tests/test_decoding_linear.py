"""Decoding of the linear, state-space and long-convolution methods (``effjax.attention.decoding``).

The conformance sweep checks a ragged prefill and steps against the forward pass at L=64 for every method that
declares decode. Here, for linear_elu, performer, performer_relu, cosformer, mamba, hyena, kernelized_rpe and
scatterbrain: what each cache holds (constant-size running sums or states whose bytes do not depend on
max_length; hyena's and kernelized_rpe's past inputs growing with it; scatterbrain's ring bounded by its window),
long runs of steps from a one-token prompt, bfloat16, non-trivial learned RPE logits, cosFormer's M, and the calls
that decoding refuses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiered

from effjax import attention
from effjax.attention import decoding

B, H, D = 2, 2, 8
PARAMS = {
    "linear_elu": dict(chunk_size=16),
    "performer": dict(num_features=32, chunk_size=16),
    "performer_relu": dict(num_features=32, chunk_size=16),
    "cosformer": dict(chunk_size=16),
    "mamba": dict(chunk_size=16),
    "hyena": dict(),
    "kernelized_rpe": dict(num_features=32),
    "scatterbrain": dict(window=8),
}
METHODS = list(PARAMS)
CONSTANT = ["linear_elu", "performer", "performer_relu", "cosformer", "mamba", "scatterbrain"]
GROWING = ["hyena", "kernelized_rpe"]
FAST = {"xla_backend_optimization_level": 0}


DEFAULT_TIER = ("mamba",)  # the long runs and bf16 of the other methods run in the slow tier


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def qkv(length, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (B, length, H, D), jnp.float32).astype(dtype) for kk in keys]


def variables_for(name, module, q, k, v):
    variables = jit(lambda key, q, k, v: module.init(key, q, k, v, causal=True))(jax.random.key(1), q, k, v)
    if name == "kernelized_rpe":  # learned logits per offset (zero at init, which would make every c equal)
        params = dict(variables["params"])
        params["rpe"] = 0.5 * jax.random.normal(jax.random.key(2), params["rpe"].shape)
        variables = {**variables, "params": params}
    return variables


def decode_all(module, variables, q, k, v, prompt_lengths, max_length, dtype):
    """Prefill of the right-padded prompts, then steps (one ``lax.scan``) to position ``max_length - 1`` of the
    row with the longest prompt; returns the prefill's outputs, its mask and the steps' outputs ``[steps, B, H,
    D]`` at positions ``prompt_lengths + step``."""
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    prompt = int(max(prompt_lengths))
    mask = np.arange(prompt)[None, :] < np.asarray(prompt_lengths)[:, None]
    cache = nn.meta.unbox(module.init_cache(B, max_length, H, D, dtype))

    def at(x, p):
        return jnp.take_along_axis(x, p[:, None, None, None], axis=1)

    def run(vs, q, k, v, cache):
        out, cache = module.apply(vs, q[:, :prompt], k[:, :prompt], v[:, :prompt], mask=mask, causal=True,
                                  cache=cache)

        def step(cache, t):
            p = lengths + t
            y, cache = module.apply(vs, at(q, p), at(k, p), at(v, p), causal=True, cache=cache, positions=p)
            return cache, y[:, 0]

        _, ys = jax.lax.scan(step, cache, jnp.arange(max_length - prompt))
        return out, ys

    out, ys = jit(run)(variables, q, k, v, cache)
    return out, mask, ys


def decoded_and_forward(name, prompt_lengths, length, dtype=jnp.float32, **params):
    module = attention.make(name, **{**PARAMS[name], **params})
    q, k, v = qkv(length, dtype)
    variables = variables_for(name, module, q, k, v)
    full = jit(lambda vs, q, k, v: module.apply(vs, q, k, v, causal=True))(variables, q, k, v)
    out, mask, ys = decode_all(module, variables, q, k, v, prompt_lengths, length, dtype)
    positions = np.asarray(prompt_lengths)[None, :] + np.arange(ys.shape[0])[:, None]  # [steps, B]
    want = np.stack([np.asarray(full, np.float32)[b, positions[:, b]] for b in range(B)], axis=1)
    prefill = np.where(mask[:, :, None, None], np.asarray(out, np.float32), 0.0)
    prefill_want = np.where(mask[:, :, None, None], np.asarray(full, np.float32)[:, :mask.shape[1]], 0.0)
    return np.asarray(ys, np.float32), want, prefill, prefill_want, float(np.abs(np.asarray(full, np.float32)).max())


def cache_bytes(name, max_length, dtype=jnp.float32, **params):
    module = attention.make(name, **{**PARAMS[name], **params})
    return decoding.cache_bytes(jax.eval_shape(lambda: module.init_cache(1, max_length, 4, 16, dtype)))


@pytest.mark.parametrize("name", CONSTANT)
def test_a_constant_state_cache_does_not_grow_with_max_length(name):
    assert cache_bytes(name, 64) == cache_bytes(name, 65536) > 0


@pytest.mark.parametrize("name", GROWING)
def test_hyena_and_kernelized_rpe_keep_past_inputs_bounded_by_max_length(name):
    small, large = cache_bytes(name, 64), cache_bytes(name, 65536)
    per_position = (large - small) / (65536 - 64)
    assert large > small
    # hyena: u (float32, heads * head_dim); kernelized_rpe: keys, values (float32) and a slot position (int32).
    assert per_position == {"hyena": 4 * 16 * 4, "kernelized_rpe": 2 * 4 * 16 * 4 + 4}[name]


def test_scatterbrain_ring_holds_the_causal_band_only():
    module = attention.make("scatterbrain", window=8)
    for max_length in (16, 4096):
        cache = jax.eval_shape(lambda m=max_length: module.init_cache(B, m, H, D, jnp.float32))
        assert nn.meta.unbox(cache)["window"]["key"].shape == (B, 8 // 2 + 1, H, D)
    short = jax.eval_shape(lambda: module.init_cache(B, 3, H, D, jnp.float32))
    assert nn.meta.unbox(short)["window"]["key"].shape[1] == 3  # never more slots than positions


@pytest.mark.parametrize("name", tiered(METHODS, DEFAULT_TIER))
def test_a_one_token_prompt_then_a_hundred_steps_equal_the_forward_pass(name):
    """Prompts of 1 and 4 tokens, then 100 steps: the state and the caches (scatterbrain's ring wraps 20 times,
    chunk 16 and the filter/RPE lengths are crossed) give the forward pass's outputs at every position."""
    ys, want, prefill, prefill_want, scale = decoded_and_forward(name, (1, 4), 104)
    np.testing.assert_allclose(prefill, prefill_want, atol=5e-5 * max(1.0, scale))
    np.testing.assert_allclose(ys, want, atol=5e-5 * max(1.0, scale))


@pytest.mark.parametrize("name", tiered(METHODS, DEFAULT_TIER))
def test_bfloat16_decoding_is_close_to_the_bfloat16_forward_pass(name):
    ys, want, prefill, prefill_want, scale = decoded_and_forward(name, (5, 12), 40, dtype=jnp.bfloat16)
    assert np.all(np.isfinite(ys))
    np.testing.assert_allclose(prefill, prefill_want, rtol=1e-2, atol=1e-2 * max(1.0, scale))
    np.testing.assert_allclose(ys, want, rtol=1e-2, atol=1e-2 * max(1.0, scale))


def test_cosformer_decoding_uses_the_fixed_max_len_as_m():
    """With max_len the forward's M is fixed, so a cache shorter than M decodes the forward with that M."""
    ys, want, prefill, prefill_want, scale = decoded_and_forward("cosformer", (3, 9), 32, max_len=100)
    np.testing.assert_allclose(prefill, prefill_want, atol=5e-5 * max(1.0, scale))
    np.testing.assert_allclose(ys, want, atol=5e-5 * max(1.0, scale))
    with pytest.raises(ValueError, match="cosformer"):
        attention.make("cosformer", max_len=16).init_cache(B, 32, H, D, jnp.float32)


def test_kernelized_rpe_and_hyena_refuse_a_cache_longer_than_their_max_length():
    for name in ("kernelized_rpe", "hyena"):
        with pytest.raises(ValueError, match=name):
            attention.make(name, max_length=16).init_cache(B, 32, H, D, jnp.float32)


@pytest.mark.parametrize("name", ["performer", "performer_relu"])
def test_redrawn_features_refuse_decoding_in_training_mode(name):
    module = attention.make(name, redraw=True, **PARAMS[name])
    q, k, v = qkv(8)
    variables = variables_for(name, module, q, k, v)
    cache = nn.meta.unbox(module.init_cache(B, 8, H, D, jnp.float32))
    with pytest.raises(ValueError, match=name):
        module.apply(variables, q, k, v, causal=True, cache=cache, deterministic=False,
                     rngs={"random": jax.random.key(3)})
    # deterministic: the stored projection
    jit(lambda vs, q, k, v, c: module.apply(vs, q, k, v, causal=True, cache=c))(variables, q, k, v, cache)


@pytest.mark.parametrize("name", ["hyena", "scatterbrain"])
def test_decoding_refuses_dropout_in_training_mode(name):
    module = attention.make(name, dropout_rate=0.1, **PARAMS[name])
    q, k, v = qkv(8)
    variables = variables_for(name, module, q, k, v)
    cache = nn.meta.unbox(module.init_cache(B, 8, H, D, jnp.float32))
    with pytest.raises(ValueError, match=name):
        module.apply(variables, q, k, v, causal=True, cache=cache, deterministic=False,
                     rngs={"dropout": jax.random.key(3)})


@pytest.mark.parametrize("name", METHODS)
def test_decoding_calls_outside_the_interface_are_refused(name):
    module = attention.make(name, **PARAMS[name])
    q, k, v = qkv(8)
    variables = variables_for(name, module, q, k, v)
    cache = nn.meta.unbox(module.init_cache(B, 8, H, D, jnp.float32))
    with pytest.raises(ValueError, match=name):  # bidirectional
        module.apply(variables, q, k, v, causal=False, cache=cache)
    with pytest.raises(ValueError, match=fr"{name}: positions must have shape \[batch\]"):  # one start per row
        module.apply(variables, q[:, :2], k[:, :2], v[:, :2], causal=True, cache=cache,
                     positions=jnp.zeros((B + 1,), jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_elu", "performer", "mamba"])
def test_a_pallas_prefill_fills_the_same_cache(name):
    """impl='pallas' (interpreted here) runs the kernel for the prefill's outputs; the cache (running sums, or
    the XLA scan's last state for mamba) and the steps are the same as the XLA path's."""
    ys, want, prefill, prefill_want, scale = decoded_and_forward(name, (5, 20), 48, impl="pallas")
    np.testing.assert_allclose(prefill, prefill_want, atol=5e-5 * max(1.0, scale))
    np.testing.assert_allclose(ys, want, atol=5e-5 * max(1.0, scale))
