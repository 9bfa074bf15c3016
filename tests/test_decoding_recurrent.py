"""Decoding of the seven recurrent methods (``recurrent.decode``): a constant-size cache, long runs of steps, bfloat16,
one compilation per step shape, the cache's contents and the refusals.

The conformance sweep (``tests/test_attention_conformance.py``) checks a ragged prefill then steps against the
forward pass at L=64 for every decoding method; here the recurrent ones go further: 100 steps after a one-token
prompt (and steps in a ``lax.scan``, so the cache is a fixed pytree of fixed dtypes), with perturbed parameters so
that every gate (RWKV-7's zero-initialised LoRAs included) reads the token shift's and the convs' history.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiered

from effjax import attention
from effjax.attention import decoding

METHODS = ("retnet", "gla", "hgrn2", "mamba2", "deltanet", "gated_deltanet", "rwkv7")
H, D = 4, 16
STATE = H * D * D * 4  # the float32 state [heads, d, d] of one sequence
# Bytes per sequence at heads 4, head dim 16, float32: the state, plus the raw (q, k, v) of the last tokens the
# short convs read (3 for the 4-tap convs of mamba2 and the delta rules, 1 for RWKV-7's token shift).
BYTES = {"retnet": STATE, "gla": STATE, "hgrn2": STATE, "mamba2": STATE + 3 * 3 * H * D * 4,
         "deltanet": STATE + 3 * 3 * H * D * 4, "gated_deltanet": STATE + 3 * 3 * H * D * 4,
         "rwkv7": STATE + 1 * 3 * H * D * 4}


# XLA's backend optimisations take most of the CPU time of these small tests and change no semantics.
FAST = {"xla_backend_optimization_level": 0}


DEFAULT_TIER = ("retnet",)  # the long runs and bf16 of the other methods run in the slow tier


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def make(name, **fields):
    return attention.make(name, chunk_size=16, **fields)  # 16 < the lengths below: the prefill crosses chunks


def qkv(batch, length, seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, length, H, D)).astype(dtype) for key in keys]


def perturbed_variables(module, q):
    """The module's variables with every parameter moved by N(0, 0.1^2): no gate stays at its (often constant)
    init, so the outputs depend on everything the cache holds."""
    variables = jit(lambda key, q: module.init(key, q, q, q, causal=True))(jax.random.key(0), q)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(key, x.shape, x.dtype)
                                     for x, key in zip(leaves, keys, strict=True)])


def decode(module, variables, q, k, v, prompt_lengths, steps, dtype=jnp.float32):
    """A ragged prefill (right-padded to the longest prompt) then ``steps`` steps in a ``lax.scan``, in one jitted
    function; returns ``(prefill outputs, step outputs [batch, steps, heads, d], the positions stepped)``."""
    batch = q.shape[0]
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    prompt = int(max(prompt_lengths))
    mask = jnp.arange(prompt)[None, :] < lengths[:, None]
    at = lambda x, p: jnp.take_along_axis(x, p[:, None, None, None], axis=1)

    @jit
    def run(variables, q, k, v):
        cache = nn.meta.unbox(module.init_cache(batch, q.shape[1], H, D, dtype))
        out, cache = module.apply(variables, q[:, :prompt], k[:, :prompt], v[:, :prompt], mask=mask, causal=True,
                                  cache=cache)

        def step(cache, position):
            y, cache = module.apply(variables, at(q, position), at(k, position), at(v, position), causal=True,
                                    cache=cache, positions=position)
            return cache, y[:, 0]

        positions = lengths[None, :] + jnp.arange(steps)[:, None]  # [steps, batch]
        _, ys = jax.lax.scan(step, cache, positions)
        return out, jnp.moveaxis(ys, 0, 1), positions.T

    return run(variables, q, k, v)


@pytest.mark.parametrize("name", METHODS)
def test_the_cache_does_not_grow_with_max_length(name):
    module = make(name)
    bytes_at = lambda length: decoding.cache_bytes(jax.eval_shape(lambda: module.init_cache(3, length, H, D,
                                                                                               jnp.float32)))
    assert bytes_at(64) == bytes_at(65536) == 3 * BYTES[name]
    leaves = jax.tree.leaves(module.init_cache(1, 64, H, D, jnp.float32), is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)


@pytest.mark.parametrize("name", tiered(METHODS, DEFAULT_TIER))
def test_a_hundred_steps_after_a_one_token_prompt_equal_the_forward_pass(name):
    module = make(name)
    q, k, v = qkv(2, 104, seed=3)
    variables = perturbed_variables(module, q)
    full = np.asarray(jit(lambda vs, q, k, v: module.apply(vs, q, k, v, causal=True))(variables, q, k, v))
    out, ys, positions = decode(module, variables, q, k, v, [1, 4], 100)
    scale = float(np.abs(full).max())
    np.testing.assert_allclose(out[0, :1], full[0, :1], atol=5e-5 * scale)
    np.testing.assert_allclose(out[1, :4], full[1, :4], atol=5e-5 * scale)
    want = np.take_along_axis(full, np.asarray(positions)[:, :, None, None], axis=1)
    np.testing.assert_allclose(ys, want, atol=5e-5 * scale, err_msg=name)


@pytest.mark.parametrize("name,fields,history", [("deltanet", dict(use_short_conv=False), 0),
                                                 ("gated_deltanet", dict(conv_size=2), 1),
                                                 ("mamba2", dict(d_conv=1), 0), ("mamba2", dict(d_conv=6), 5),
                                                 ("retnet", dict(rotary=False), 0), ("gla", dict(form="parallel"), 0)])
def test_variants_decode_with_the_history_their_convs_need(name, fields, history):
    """Without short convs (no history), other conv widths (prompts shorter than the history: zeros before the
    first token), no rotation, and a non-default form for the prefill."""
    module = make(name, **fields)
    cache = module.init_cache(2, 64, H, D, jnp.float32)
    assert (cache["history"].value.shape[1] if "history" in cache else 0) == history
    q, k, v = qkv(2, 14, seed=4)
    variables = perturbed_variables(module, q)
    full = np.asarray(jit(lambda vs, q, k, v: module.apply(vs, q, k, v, causal=True))(variables, q, k, v))
    _, ys, positions = decode(module, variables, q, k, v, [2, 5], 9)
    want = np.take_along_axis(full, np.asarray(positions)[:, :, None, None], axis=1)
    np.testing.assert_allclose(ys, want, atol=5e-5 * float(np.abs(full).max()))


@pytest.mark.parametrize("name", tiered(METHODS, DEFAULT_TIER))
def test_bfloat16_decoding_stays_near_the_bfloat16_forward_pass(name):
    module = make(name)
    q, k, v = qkv(2, 24, seed=5, dtype=jnp.bfloat16)
    variables = perturbed_variables(module, q)
    full = jit(lambda vs, q, k, v: module.apply(vs, q, k, v, causal=True))(variables, q, k, v)
    out, ys, positions = decode(module, variables, q, k, v, [5, 11], 13, dtype=jnp.bfloat16)
    assert out.dtype == ys.dtype == jnp.bfloat16
    full = np.asarray(full, np.float32)
    want = np.take_along_axis(full, np.asarray(positions)[:, :, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(ys, np.float32), want, rtol=1e-2, atol=1e-2 * float(np.abs(full).max()))


@pytest.mark.parametrize("name", tiered(METHODS, DEFAULT_TIER))
def test_a_jitted_step_compiles_once_and_keeps_the_cache_s_shapes_and_dtypes(name):
    module = make(name)
    q, k, v = qkv(2, 1, seed=6)
    variables = perturbed_variables(module, q)
    empty = nn.meta.unbox(module.init_cache(2, 64, H, D, jnp.float32))
    step = jit(lambda vs, q, k, v, c, p: module.apply(vs, q, k, v, causal=True, cache=c, positions=p))
    y, cache = step(variables, q, k, v, empty, jnp.array([3, 9], jnp.int32))
    y2, cache = step(variables, v, q, k, cache, jnp.array([4, 10], jnp.int32))
    assert step._cache_size() == 1
    assert jax.tree.structure(cache) == jax.tree.structure(empty)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(empty), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert y.shape == y2.shape == (2, 1, H, D) and np.all(np.isfinite(y2))


@pytest.mark.parametrize("name", ["mamba2", "deltanet", "rwkv7"])
def test_the_prefill_keeps_the_last_real_inputs_as_the_history(name):
    """Right padding never enters the history: a row's history is its last real tokens' raw inputs, zeros before
    a short prompt's first token, in the order the method stacks them (mamba2: v, k, q)."""
    module = make(name)
    q, k, v = qkv(2, 6, seed=7)
    variables = perturbed_variables(module, q)
    lengths = np.array([2, 6])
    cache = nn.meta.unbox(module.init_cache(2, 64, H, D, jnp.float32))
    mask = np.arange(6)[None] < lengths[:, None]
    _, cache = jit(lambda vs, q, k, v, c: module.apply(vs, q, k, v, mask=mask, causal=True, cache=c))(
        variables, q, k, v, cache)
    streams = np.stack([v, k, q] if name == "mamba2" else [q, k, v], axis=2)
    count = cache["history"].shape[1]
    for row, n in enumerate(lengths):
        want = np.concatenate([np.zeros((max(count - n, 0), 3, H, D)), streams[row, max(n - count, 0):n]])
        np.testing.assert_array_equal(cache["history"][row], want)


@pytest.mark.parametrize("name", METHODS)
def test_calls_outside_the_interface_are_refused_naming_the_method(name):
    module = make(name, **({"bidirectional": "sum"} if name in ("gla", "mamba2", "deltanet", "gated_deltanet",
                                                                  "rwkv7") else {}))
    q, k, v = qkv(2, 5, seed=8)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), q, k, v, causal=True))
    cache = nn.meta.unbox(module.init_cache(2, 64, H, D, jnp.float32))
    call = lambda **kw: module.apply(variables, q, k, v, cache=kw.pop("cache", cache), **kw)
    with pytest.raises(ValueError, match=f"{name}: decoding .* causal=True"):
        call(causal=False)
    with pytest.raises(ValueError, match=f"{name}: decoding takes no segment_ids"):
        call(causal=True, segment_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match=fr"{name}: positions must have shape \[batch\] = \(2,\)"):
        call(causal=True, positions=jnp.zeros((3,), jnp.int32))  # a chunk of 5 is an extend: each row's start
    other = nn.meta.unbox(module.init_cache(3, 64, H, D, jnp.float32))
    with pytest.raises(ValueError, match=f"{name}: the cache's state must be float32 of shape"):
        call(causal=True, cache=other)
