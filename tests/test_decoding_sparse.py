"""Decoding of the causal softmax-family methods (sliding_window, longformer, block_local, primer_mdha,
shvit_single_head, packed, probsparse; ``effjax.attention.decoding``): the windowed caches' memory is bounded by
the window, not the context, a full cache grows linearly, and a ragged prefill then one token at a time equals
the causal forward pass where the ring wraps many times, prompts outrun the window or block, global tokens sit
inside and outside the prompt, Primer's shared Q/K convolves, ProbSparse's lazy queries take the running mean, and
in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from effjax import attention
from effjax.attention import decoding, softmax

H, D = 2, 8
FAST = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def cache_size(name, max_length, **params):
    module = attention.make(name, **params)
    return decoding.cache_bytes(jax.eval_shape(lambda: module.init_cache(1, max_length, 4, 16, jnp.float32)))


@pytest.mark.parametrize("name,params", [("sliding_window", dict(window=64)), ("longformer", dict(window=64)),
                                         ("block_local", dict(block_size=64))])
def test_a_window_or_block_cache_does_not_grow_with_the_context(name, params):
    assert cache_size(name, 1024, **params) == cache_size(name, 65536, **params)
    # Bounded by the window, not padded to the context: window + 1 (+ one global) or block_size slots.
    slots = {"sliding_window": 65, "longformer": 66, "block_local": 64}[name]
    assert cache_size(name, 65536, **params) == slots * (2 * 4 * 16 * 4 + 4)


@pytest.mark.parametrize("name", ["packed", "shvit_single_head", "primer_mdha", "probsparse"])
def test_a_full_cache_grows_linearly_with_max_length(name):
    sizes = [cache_size(name, n) for n in (1024, 2048, 4096)]
    assert sizes[2] - sizes[1] == 2 * (sizes[1] - sizes[0]) > 0


def test_the_window_cache_shrinks_to_max_length_and_refuses_nothing_shorter():
    assert cache_size("sliding_window", 10, window=256) == cache_size("packed", 10)
    assert cache_size("block_local", 10, block_size=64) == cache_size("packed", 10)


def random_qkv(seed, batch, length, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, length, H, D), dtype) for key in keys]


def decode(name, prompts, length, *, max_length=None, dtype=jnp.float32, seed=0, **params):
    """(decoded, forward): the causal forward over ``length`` tokens, and the outputs of a prefill of the ragged
    ``prompts`` (right-padded) then steps up to position length - 1 of the longest prompt's row, at the same
    positions (elsewhere zero in both)."""
    prompts = np.asarray(prompts)
    batch, prompt = len(prompts), int(prompts.max())
    q, k, v = random_qkv(seed, batch, length, dtype)
    module = attention.make(name, **params)
    variables = jit(lambda key, q, k, v: module.init(key, q, k, v, causal=True))(jax.random.key(1), q, k, v)
    forward = np.asarray(jit(lambda vs, q, k, v: module.apply(vs, q, k, v, causal=True))(variables, q, k, v),
                         np.float32)
    cache = nn.meta.unbox(module.init_cache(batch, max_length or length, H, D, dtype))
    mask = np.arange(prompt)[None, :] < prompts[:, None]
    out, cache = jit(lambda vs, q, k, v, c: module.apply(vs, q, k, v, mask=mask, causal=True, cache=c))(
        variables, q[:, :prompt], k[:, :prompt], v[:, :prompt], cache)
    decoded = np.zeros_like(forward)
    decoded[:, :prompt] = np.where(mask[:, :, None, None], np.asarray(out, np.float32), 0)
    seen = np.zeros(forward.shape[:2], bool)
    seen[:, :prompt] = mask
    at = lambda x, p: jnp.take_along_axis(x, p[:, None, None, None], axis=1)

    def step(cache, positions):  # one token per row at positions; the steps run in one jitted scan
        out, cache = module.apply(variables, at(q, positions), at(k, positions), at(v, positions), causal=True,
                                  cache=cache, positions=positions)
        return cache, out[:, 0]

    steps = jnp.asarray(prompts, jnp.int32)[None, :] + jnp.arange(length - prompt, dtype=jnp.int32)[:, None]
    _, outs = jit(lambda c, p: jax.lax.scan(step, c, p))(cache, steps)
    rows = np.arange(batch)[None, :]
    decoded[rows, np.asarray(steps)] = np.asarray(outs, np.float32)
    seen[rows, np.asarray(steps)] = True
    return decoded, np.where(seen[:, :, None, None], forward, 0)


def assert_equal_to_the_forward(decoded, forward, tol=5e-5):
    np.testing.assert_allclose(decoded, forward, atol=tol * max(1.0, float(np.abs(forward).max())))


def test_a_small_window_wraps_many_times_and_equals_the_forward():
    # A 3-token prompt, window 4 (a ring of 5 slots), 60 steps: the ring wraps 12 times.
    assert_equal_to_the_forward(*decode("sliding_window", [3, 3], 63, window=4))


def test_prompts_longer_than_the_window_and_a_cache_longer_than_the_sequence():
    assert_equal_to_the_forward(*decode("sliding_window", [20, 7], 40, max_length=100, window=4))
    # window + 1 > max_length: max_length slots, full causal attention.
    assert_equal_to_the_forward(*decode("sliding_window", [9, 2], 24, window=100))


def test_longformer_globals_inside_and_outside_the_prompt_and_the_window():
    # 3 global tokens, window 2: one prompt shorter than the globals (they arrive in steps), one longer.
    assert_equal_to_the_forward(*decode("longformer", [1, 9], 32, window=2, num_global=3))
    assert_equal_to_the_forward(*decode("longformer", [5, 2], 24, window=3, num_global=0))


def test_block_local_prompts_of_any_length_and_a_block_longer_than_the_cache():
    assert_equal_to_the_forward(*decode("block_local", [3, 10], 32, block_size=4))
    assert_equal_to_the_forward(*decode("block_local", [7, 2], 16, block_size=64))  # one block: causal softmax


def test_causal_block_local_takes_any_length_as_the_prefix_of_a_longer_sequence():
    from effjax.attention import block_local

    q, k, v = random_qkv(2, 2, 16)
    mask = np.arange(16)[None, :] < np.array([[9], [16]])
    real = mask[:, :13, None, None]  # a padded query's output (no allowed key) is unspecified
    longer = block_local.attend(q, k, v, mask=mask, causal=True, block_size=4)[:, :13]
    cut = block_local.attend(q[:, :13], k[:, :13], v[:, :13], mask=mask[:, :13], causal=True, block_size=4)
    np.testing.assert_allclose(np.where(real, cut, 0), np.where(real, longer, 0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_local: sequence length 13 is not divisible by block_size 4"):
        block_local.attend(q[:, :13], k[:, :13], v[:, :13], block_size=4)


@pytest.mark.parametrize("params", [dict(), dict(share_qk=True)], ids=["mdha", "share_qk"])
def test_primer_convolves_the_steps_as_the_forward(params):
    assert_equal_to_the_forward(*decode("primer_mdha", [1, 6], 20, **params))


def test_primer_centered_refuses_decoding():
    module = attention.make("primer_mdha", centered=True)
    with pytest.raises(NotImplementedError, match="primer_mdha"):
        module.init_cache(1, 8, H, D, jnp.float32)


@pytest.mark.parametrize("name", ["packed", "shvit_single_head"])
def test_full_cache_methods_equal_the_forward(name):
    params = dict(qk_dim=6, partial_ratio=0.5) if name == "shvit_single_head" else {}
    assert_equal_to_the_forward(*decode(name, [4, 11], 20, **params))


@pytest.mark.parametrize("quirks", [False, True])
def test_probsparse_active_and_lazy_steps_equal_the_forward(quirks):
    # factor 1 at 40 tokens: u = 4 active queries among the earlier ones, so most steps are lazy.
    decoded, forward = decode("probsparse", [3, 12], 40, factor=1, resample=False, reference_quirks=quirks)
    assert_equal_to_the_forward(decoded, forward)
    q, k, v = random_qkv(0, 2, 40)
    dense = np.asarray(softmax.attend(q, k, v, causal=True))
    # Steps of both rows (positions 12..30): per head, softmax (active) or not (lazy).
    active = np.all(np.isclose(forward, dense, atol=1e-5), axis=3)[:, 12:31]
    assert active.any() and not active.all(), "the steps must take both the softmax and the lazy path"


def test_probsparse_decodes_the_forward_over_max_length():
    # The prefill of a short prompt uses u and the sample count of max_length (here 40, the forward's length).
    assert_equal_to_the_forward(*decode("probsparse", [30, 33], 40, factor=1, resample=False))


@pytest.mark.parametrize("name,params", [("sliding_window", dict(window=4)), ("primer_mdha", {}),
                                         ("longformer", dict(window=3, num_global=2))])
def test_bfloat16_decoding_is_close_to_the_bfloat16_forward(name, params):
    decoded, forward = decode(name, [3, 8], 24, dtype=jnp.bfloat16, **params)
    np.testing.assert_allclose(decoded, forward, rtol=1e-2, atol=1e-2 * float(np.abs(forward).max()))
