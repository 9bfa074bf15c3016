"""Conformance of every registered attention method to the effjax contract, at L=64 with small sizes.

Each method in ``effjax.attention.names()`` (new modules are picked up automatically) is built with
``make(name, **small_params(name))`` and checked for: output shape/dtype, finite values and finite
jitted gradients, bfloat16, that a one-layer ListOps-sized encoder using it lowers its loss in a few Adam
steps on one fixed batch, and a run inside the ViT. Each capability the module declares in ``CAPABILITIES``
(``effjax.attention._capabilities``) must work: padding invariance (mask), causality (causal, also inside the
LM), segment isolation (segments), cross attention (cross), dropout acting in training only (dropout), the
kernel path matching the XLA path (pallas). Each capability it does not declare must be refused by a
NotImplementedError or ValueError naming the method (dropout excepted: an undeclared rate changes nothing).
"""

import dataclasses
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import tiered

import effjax.models as models
from effjax import attention
from effjax.attention._capabilities import Capabilities, capabilities, supporting
from effjax.models.layers import MultiHeadAttention

B, L, H, D = 2, 64, 4, 16
REAL = 40  # row 0 has REAL real tokens, row 1 is all real
MASK = np.arange(L)[None, :] < np.array([[REAL], [L]])

# Small sizes per method, so the L=64 tests exercise the efficient path (not a window covering all).
# Entries for fields a method does not have are dropped by small_params (names may drift while the
# methods are written); methods not listed use make(name) defaults.
SMALL = {
    "linformer": dict(k=16),
    "nystromformer": dict(num_landmarks=8),
    "sliding_window": dict(window=8),
    "longformer": dict(window=8),
    "bigbird": dict(block_size=8),
    "block_local": dict(block_size=16),
    "performer": dict(num_features=64, chunk_size=16),  # chunk 16 < L: the causal scan crosses chunks
    "cosformer": dict(chunk_size=16),
    "linear_elu": dict(chunk_size=16),
    "reformer": dict(chunk_size=16),
    "probsparse": dict(resample=False),  # the encoder test below passes no "random" RNG stream
    "kernelized_rpe": dict(num_features=32),
    "mamba": dict(chunk_size=16),  # chunk 16 < L: the scan carries its state across chunks
    "performer_relu": dict(num_features=64, chunk_size=16),
    "flat_window": dict(window=(4, 4), group_size=12),  # 12 does not divide 64: padded last group
    # The recurrent families: chunk 16 < L so the state crosses chunks; those without a bidirectional form of their
    # own are checked as the forward-plus-reversed sum (their causal=False is refused by default).
    "retnet": dict(chunk_size=16),
    "hgrn2": dict(chunk_size=16),
    "gla": dict(chunk_size=16, bidirectional="sum"),
    "mamba2": dict(chunk_size=16, bidirectional="sum"),
    "deltanet": dict(chunk_size=16, bidirectional="sum"),
    "gated_deltanet": dict(chunk_size=16, bidirectional="sum"),
    "rwkv7": dict(chunk_size=16, bidirectional="sum"),
}
NAMES = attention.names()



# softmax (dense), block-sparse, linear (kernel features), a grid mixer.
MODEL_TIER = ("softmax", "bigbird", "linear_elu", "slab_sla")
# The same with a softmax variant, a low-rank method, a long convolution and a sorted/grouped method.
FAMILY_TIER = (*MODEL_TIER, "scatterbrain", "linformer", "hyena", "flat_window")
# Mixers whose mixing weights are learned parameters, not a function of q (UniFormer's local MHRA is a conv on v).
QUERY_FREE = {"uniformer_local"}
# XLA's backend optimisations take most of the CPU time of these small tests and change no semantics.
FAST = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def small_params(name):
    cls = importlib.import_module(f"effjax.attention.{name}").Attention
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return {key: val for key, val in SMALL.get(name, {}).items() if key in fields}


def qkv(seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (B, L, H, D), dtype) for kk in keys]


def build(name, q, k, v, **call):
    """The module, its variables (initialised with the same call arguments) and its un-jitted apply."""
    module = attention.make(name, **small_params(name))
    variables = jit(lambda key, q, k, v: module.init(key, q, k, v, **call))(jax.random.key(0), q, k, v)
    return module, variables, lambda vs, q, k, v: module.apply(vs, q, k, v, **call)


def declares(name, flag):
    """Whether method ``name`` declares capability ``flag`` in its ``CAPABILITIES``."""
    return getattr(capabilities(name), flag)


def check_refused(name, flag, fn):
    """Asserts that ``fn`` (which asks ``name`` for ``flag``) raises NotImplementedError or ValueError naming it."""
    try:
        fn()
    except (NotImplementedError, ValueError) as err:
        assert name in str(err), f"{name}: the refusal of {flag} must name the method, got: {err}"
        return
    raise AssertionError(f"{name} does not declare {flag} but did not refuse it (declare it, or refuse it)")


def as_declared(name, flag, fn):
    """``fn()`` where ``name`` declares ``flag``; where it does not, checks that ``fn`` is refused, returns None."""
    if not declares(name, flag):
        check_refused(name, flag, fn)
        return None
    try:
        return fn()
    except NotImplementedError as err:
        raise AssertionError(f"{name} declares {flag} but refuses it: {err}") from err


def masked(name):
    """The key-padding call argument where ``name`` declares a mask, else none."""
    return {"mask": MASK} if declares(name, "mask") else {}


@pytest.mark.parametrize("name", NAMES)
def test_registered_name_is_a_method_module(name):
    module = importlib.import_module(f"effjax.attention.{name}")
    assert callable(getattr(module, "attend", None)), f"effjax.attention.{name} has no attend()"
    assert isinstance(getattr(module, "Attention", None), type), f"effjax.attention.{name} has no Attention"
    assert module.__doc__ and module.__doc__.strip(), f"effjax.attention.{name} has no module docstring"
    fields = {f.name for f in dataclasses.fields(module.Attention)}
    assert "dropout_rate" in fields
    attention.make(name, dropout_rate=0.1)
    declared = capabilities(name)
    assert isinstance(declared, Capabilities)
    assert declared.pallas == ("impl" in fields), f"{name}: pallas={declared.pallas} but impl field: {'impl' in fields}"
    if not declared.pallas:
        check_refused(name, "pallas", lambda: attention.make(name, impl="pallas"))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_finite_values_and_jitted_gradients(name):
    q, k, v = qkv(0)
    _, variables, fn = build(name, q, k, v, **masked(name))
    apply = jit(fn)
    out = apply(variables, q, k, v)
    assert out.shape == (B, L, H, D) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))

    loss = lambda vs, q, k, v: jnp.sum(jnp.sin(fn(vs, q, k, v)))
    grads = jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(variables, q, k, v)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    assert name in QUERY_FREE or float(jnp.abs(grads[1]).sum()) > 0
    assert float(jnp.abs(grads[3]).sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_padded_tokens_do_not_change_real_outputs_where_declared_else_refused(name):
    q, k, v = qkv(1)
    built = as_declared(name, "mask", lambda: build(name, q, k, v, mask=MASK))
    if built is None:
        return
    _, variables, fn = built
    apply = jit(fn)
    out = apply(variables, q, k, v)
    padded = ~MASK[:, :, None, None]
    out2 = apply(variables, q, k + 3.0 * padded, v + 3.0 * padded)
    np.testing.assert_allclose(out2[0, :REAL], out[0, :REAL], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2[1], out[1], rtol=1e-5, atol=1e-5)
    # Padded queries too (methods that hash, sort, pool or convolve over queries must not let them in).
    out3 = apply(variables, q + 3.0 * padded, k + 3.0 * padded, v + 3.0 * padded)
    np.testing.assert_allclose(out3[0, :REAL], out[0, :REAL], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_key_bias_acts_as_duplicated_keys_where_declared_else_refused(name):
    # Proportional attention (ToMe Eq. 1): a key with logit bias log(s) weighs as s identical keys.
    call = importlib.import_module(f"effjax.attention.{name}").Attention.__call__
    takes = "key_bias" in inspect.signature(call).parameters
    assert takes == declares(name, "key_bias"), f"{name}: key_bias declared {declares(name, 'key_bias')}, taken {takes}"
    if not takes:
        layer = MultiHeadAttention(H, D, name, small_params(name))
        x = jnp.ones((B, L, H * D))
        check_refused(name, "key_bias", lambda: layer.init(jax.random.key(0), x, key_bias=jnp.zeros((B, L))))
        return
    q, k, v = qkv(2)
    sizes = np.asarray(jax.random.randint(jax.random.key(5), (B, L), 1, 4))
    module, variables, fn = build(name, q, k, v)
    out = jit(lambda vs, q, k, v, bias: module.apply(vs, q, k, v, key_bias=bias))(
        variables, q, k, v, jnp.log(sizes.astype(np.float32)))
    assert np.all(np.isfinite(out))
    assert declares(name, "cross"), f"{name}: the duplicated-keys oracle needs cross attention"
    for row in range(B):
        dup_k, dup_v = (jnp.repeat(t[row:row + 1], sizes[row], axis=1) for t in (k, v))
        dup = module.apply(variables, q[row:row + 1], dup_k, dup_v)
        np.testing.assert_allclose(out[row:row + 1], dup, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_causal_never_reads_the_future_where_declared_else_refused(name):
    q, k, v = qkv(2)
    built = as_declared(name, "causal", lambda: build(name, q, k, v, causal=True))
    if built is None:
        return
    _, variables, fn = built
    apply = jit(fn)
    out = apply(variables, q, k, v)
    t = 37
    out2 = apply(variables, q.at[:, t].add(3.0), k.at[:, t].add(3.0), v.at[:, t].add(3.0))
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2[:, t:], out[:, t:])


@pytest.mark.parametrize("name", NAMES)
def test_segments_are_isolated_where_declared_else_refused(name):
    q, k, v = qkv(3)
    segments = np.repeat(np.array([[1, 2], [1, 2]]), [24, L - 24], axis=1)  # not 0: `packed` reads 0 as padding
    built = as_declared(name, "segments", lambda: build(name, q, k, v, segment_ids=segments))
    if built is None:
        return
    _, variables, fn = built
    apply = jit(fn)
    out = apply(variables, q, k, v)
    later = (segments == 2)[:, :, None, None]
    out2 = apply(variables, q + 3.0 * later, k + 3.0 * later, v + 3.0 * later)
    np.testing.assert_allclose(out2[:, :24], out[:, :24], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", tiered(NAMES, FAMILY_TIER))
def test_bfloat16_inputs_give_finite_bfloat16_outputs(name):
    q, k, v = qkv(4, jnp.bfloat16)
    _, variables, fn = build(name, q, k, v, **masked(name))
    apply = jit(fn)
    out = apply(variables, q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, L, H, D)
    assert np.all(np.isfinite(out.astype(np.float32)))


# Cross attention: Q_LEN queries over L keys, with less padding than MASK so that, aligned to the end of the keys,
# the last query of a sliding window of 8 still sees a real key.
Q_LEN = 48
CROSS_MASK = np.arange(L)[None, :] < np.array([[56], [L]])


@pytest.mark.parametrize("name", NAMES)
def test_cross_attention_ignores_padded_keys_where_declared_else_refused(name):
    q, k, v = qkv(11)
    q = q[:, :Q_LEN]
    built = as_declared(name, "cross", lambda: build(name, q, k, v, mask=CROSS_MASK))
    if built is None:
        return
    _, variables, fn = built
    apply = jit(fn)
    out = apply(variables, q, k, v)
    assert out.shape == (B, Q_LEN, H, D) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    padded = ~CROSS_MASK[:, :, None, None]
    out2 = apply(variables, q, k + 3.0 * padded, v + 3.0 * padded)
    np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", tiered(NAMES, FAMILY_TIER))
def test_dropout_acts_in_training_only_where_declared(name):
    """Where undeclared, a dropout rate is accepted and changes nothing (models pass one rate to every layer)."""
    q, k, v = qkv(12)
    module = attention.make(name, **{**small_params(name), "dropout_rate": 0.3})
    variables = jit(lambda key, q, k, v: module.init(key, q, k, v))(jax.random.key(0), q, k, v)

    @jit
    def train_and_evaluation(vs, q, k, v):
        train = module.apply(vs, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)})
        return train, module.apply(vs, q, k, v)

    train, evaluation = train_and_evaluation(variables, q, k, v)
    assert np.all(np.isfinite(train))
    acts = float(jnp.abs(train - evaluation).max()) > 1e-3
    assert acts == declares(name, "dropout"), f"{name}: dropout acts {acts}, declared {declares(name, 'dropout')}"


@pytest.mark.parametrize("name", tiered(NAMES, MODEL_TIER))
def test_trains_inside_the_listops_encoder(name):
    model = models.build("encoder_classifier", vocab_size=16, num_classes=10, max_length=64, num_layers=1,
                         embed_dim=32, num_heads=4, mlp_dim=64, attention=name, attention_params=small_params(name))
    # 63 tokens + the CLS token = attention length 64; row 1 ends in 13 padding tokens (id 0).
    tokens = jax.random.randint(jax.random.key(5), (4, L - 1), 1, 16).at[1, 50:].set(0)
    labels = jax.random.randint(jax.random.key(6), (4,), 0, 10)
    params = jit(model.init)(jax.random.key(7), tokens)
    tx = optax.adam(3e-3)

    # Training mode (model and attention dropout 0.1) with one fixed dropout key, so the objective
    # is the same function at every step.
    dropout = {"dropout": jax.random.key(8)}

    def loss_fn(p):
        logits = model.apply(p, tokens, deterministic=False, rngs=dropout)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jit
    def step(p, opt):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    losses = []
    for _ in range(8):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", tiered(NAMES, MODEL_TIER))
def test_runs_inside_the_vit_and_inside_the_lm_where_causal_is_declared(name):
    shared = dict(num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, attention=name,
                  attention_params={name: small_params(name)})
    vit = models.build("vit_classifier", vocab_size=257, num_classes=10, image_size=(16, 16), patch_size=2,
                       **shared)  # an 8 x 8 grid of 64 patch tokens
    pixels = jax.random.randint(jax.random.key(9), (2, 256), 1, 257)
    variables = jit(vit.init)(jax.random.key(0), pixels)
    logits = jit(vit.apply)(variables, pixels)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))

    lm = models.build("decoder_lm", vocab_size=32, num_classes=None, max_length=L, **shared)
    tokens = jax.random.randint(jax.random.key(10), (2, L), 1, 32).at[0, 50:].set(0)
    variables = as_declared(name, "causal", lambda: jit(lm.init)(jax.random.key(0), tokens))
    if variables is None:
        return
    logits = jit(lm.apply)(variables, tokens)
    assert logits.shape == (2, L, 32) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", NAMES)
def test_grouped_kv_heads_act_as_repeated_heads_where_declared_else_refused(name):
    """Grouped-query attention: k and v with half the heads equal k and v with each head repeated for its two query
    heads (query head i reads kv head i // 2)."""
    from effjax.attention.softmax import repeat_kv

    q, k, v = qkv(12)
    k, v = k[:, :, ::2], v[:, :, ::2]
    module = attention.make(name, **small_params(name))
    init = lambda k, v: jit(module.init)(jax.random.key(0), q, k, v)
    if not declares(name, "grouped_kv"):
        check_refused(name, "grouped_kv", lambda: init(k, v))
        return
    try:
        variables = init(k, v)
    except (NotImplementedError, ValueError) as err:
        raise AssertionError(f"{name} declares grouped_kv but refuses it: {err}") from err
    got = jit(module.apply)(variables, q, k, v)
    want = jit(module.apply)(variables, q, repeat_kv(k, H), repeat_kv(v, H))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


PROMPT_LENGTHS = np.array([11, 24])  # ragged prompts, right-padded to 24; the steps then run to position L - 1


# Decoding in the default tier: a key/value cache, a ring, a block ring, kernel-feature sums, a decayed state, the delta
# rule with conv histories, RWKV-7's token shift, a selective scan, a long convolution, and refusals.
DECODE_TIER = ("softmax", "sliding_window", "block_local", "linear_elu", "retnet", "gated_deltanet", "rwkv7", "mamba",
               "hyena", "bigbird", "linformer")


@pytest.mark.parametrize("name", tiered(NAMES, DECODE_TIER))
def test_prefill_then_steps_equal_the_forward_pass_where_decode_is_declared_else_refused(name):
    """Cached or recurrent decoding (``effjax.attention.decoding``): a ragged prefill, then one token at a time,
    gives the causal forward pass's outputs at every position (a sliding window's cache wraps: window 8 < L)."""
    lm = models.build("decoder_lm", vocab_size=32, num_classes=None, max_length=L, num_layers=1, embed_dim=32,
                      num_heads=4, attention=name, attention_params={name: small_params(name)})
    has_cache = hasattr(importlib.import_module(f"effjax.attention.{name}").Attention, "init_cache")
    if not declares(name, "decode"):
        assert not has_cache, f"{name} has init_cache but does not declare decode"
        check_refused(name, "decode", lambda: lm.init_cache(B, L))
        return
    assert has_cache, f"{name} declares decode but its Attention has no init_cache"
    q, k, v = qkv(11)
    _, variables, fn = build(name, q, k, v, causal=True)
    full = jit(fn)(variables, q, k, v)
    module = attention.make(name, **small_params(name))
    cache = nn.meta.unbox(module.init_cache(B, L, H, D, jnp.float32))
    prompt = int(PROMPT_LENGTHS.max())
    prompt_mask = np.arange(prompt)[None, :] < PROMPT_LENGTHS[:, None]
    out, cache = jit(lambda vs, q, k, v, c: module.apply(vs, q, k, v, mask=prompt_mask, causal=True, cache=c))(
        variables, q[:, :prompt], k[:, :prompt], v[:, :prompt], cache)
    scale = max(1.0, float(np.abs(full).max()))
    np.testing.assert_allclose(np.where(prompt_mask[:, :, None, None], out, 0),
                               np.where(prompt_mask[:, :, None, None], full[:, :prompt], 0), atol=5e-5 * scale)
    step = jit(lambda vs, q, k, v, c, p: module.apply(vs, q, k, v, causal=True, cache=c, positions=p))
    positions = jnp.asarray(PROMPT_LENGTHS, jnp.int32)
    at = lambda x, p: jnp.take_along_axis(x, p[:, None, None, None], axis=1)
    for _ in range(L - prompt):
        out, cache = step(variables, at(q, positions), at(k, positions), at(v, positions), cache, positions)
        np.testing.assert_allclose(out, at(full, positions), atol=5e-5 * scale,
                                   err_msg=f"{name}: step at positions {positions}")
        positions = positions + 1


# Extends (a chunked prefill) in the default tier: a key/value cache, a ring shorter than a chunk, kernel-feature
# sums, a decayed state, the delta rule with conv histories, RWKV-7's token shift, an extend run as steps (the
# selective scan), a block ring run as steps, and a method that does not decode.
EXTEND_TIER = ("softmax", "sliding_window", "linear_elu", "retnet", "gated_deltanet", "rwkv7", "mamba", "block_local",
               "bigbird")
# After the ragged prefill (PROMPT_LENGTHS), two right-padded chunks per row: real tokens per chunk, then the rest.
CHUNK_REAL = np.array([[13, 9], [5, 16]])


@pytest.mark.parametrize("name", tiered(NAMES, EXTEND_TIER))
def test_prefill_then_extends_equal_the_forward_pass_where_extend_is_declared_else_refused(name):
    """A ragged prefill, then two ragged chunks continuing the cache (``decoding``, extend), then one step give the
    causal forward pass's outputs at every real position; sliding_window's ring (window 8) is shorter than a
    chunk, and a chunk's padding changes no cache (the step after it would see it)."""
    q, k, v = qkv(12)
    module = attention.make(name, **small_params(name))
    if not declares(name, "decode"):
        assert not declares(name, "extend"), f"{name} declares extend but not decode: an extend continues a cache"
        return  # refused at init_cache (the decode test)
    cache = nn.meta.unbox(module.init_cache(B, L, H, D, jnp.float32))
    _, variables, fn = build(name, q, k, v, causal=True)
    prompt = int(PROMPT_LENGTHS.max())
    prompt_mask = np.arange(prompt)[None, :] < PROMPT_LENGTHS[:, None]
    _, cache = jit(lambda vs, q, k, v, c: module.apply(vs, q, k, v, mask=prompt_mask, causal=True, cache=c))(
        variables, q[:, :prompt], k[:, :prompt], v[:, :prompt], cache)
    width = int(CHUNK_REAL.max())
    chunk_mask = lambda real: np.arange(width)[None, :] < real[:, None]  # noqa: E731
    take = lambda x, start: jnp.take_along_axis(  # noqa: E731
        x, jnp.minimum(start[:, None] + jnp.arange(width)[None, :], L - 1)[:, :, None, None], axis=1)
    extend = jit(lambda vs, q, k, v, c, p, m: module.apply(vs, q, k, v, causal=True, cache=c, positions=p, mask=m))
    positions = jnp.asarray(PROMPT_LENGTHS, jnp.int32)
    if not declares(name, "extend"):
        check_refused(name, "extend", lambda: extend(variables, take(q, positions), take(k, positions),
                                                     take(v, positions), cache, positions, chunk_mask(CHUNK_REAL[0])))
        return
    full = jit(fn)(variables, q, k, v)
    scale = max(1.0, float(np.abs(full).max()))
    for real in CHUNK_REAL:
        mask = chunk_mask(real)
        out, cache = extend(variables, take(q, positions), take(k, positions), take(v, positions), cache, positions,
                            mask)
        np.testing.assert_allclose(np.where(mask[:, :, None, None], out, 0),
                                   np.where(mask[:, :, None, None], take(full, positions), 0), atol=5e-5 * scale,
                                   err_msg=f"{name}: chunk from positions {positions}")
        positions = positions + jnp.asarray(real, jnp.int32)
    at = lambda x, p: jnp.take_along_axis(x, p[:, None, None, None], axis=1)  # noqa: E731
    out, _ = jit(lambda vs, q, k, v, c, p: module.apply(vs, q, k, v, causal=True, cache=c, positions=p))(
        variables, at(q, positions), at(k, positions), at(v, positions), cache, positions)
    np.testing.assert_allclose(out, at(full, positions), atol=5e-5 * scale, err_msg=f"{name}: the step after")


PALLAS = supporting("pallas")


def masked_loss_value_and_grads(name, impl, *, jitted=True):
    """The method's value and gradients (params, q, k, v) of a random projection of its output; padded queries
    are left out (zero cotangent): their outputs are unspecified, and the kernels average only the visited blocks
    for a query with no allowed key."""
    q, k, v = qkv(7)
    ct = jax.random.normal(jax.random.key(8), q.shape) * MASK[:, :, None, None]
    causal = declares(name, "causal")
    module = attention.make(name, impl=impl, **small_params(name))
    variables = module.init(jax.random.key(0), q, k, v, mask=MASK, causal=causal)

    def loss(vs, q, k, v):
        return jnp.sum(module.apply(vs, q, k, v, mask=MASK, causal=causal) * ct)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return (jit(fn) if jitted else fn)(variables, q, k, v)


def assert_same_as_xla(name, got):
    want = masked_loss_value_and_grads(name, "xla")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())))


# The recurrent families check their kernel paths in their own files, against their XLA paths with the state in and
# out, packing and padding, on Triton and Mosaic TPU (tests/test_attention_decay_kernels.py, _delta_kernels.py), and
# declare no dropout: the three kernel checks below are not repeated for them.
OWN_KERNEL_TESTS = frozenset({"retnet", "gla", "hgrn2", "mamba2", "deltanet", "gated_deltanet"})
KERNEL_CHECKED = [name for name in PALLAS if name not in OWN_KERNEL_TESTS]


@pytest.mark.parametrize("name", tiered(KERNEL_CHECKED, ("softmax", "bigbird", "linear_elu")))
def test_impl_pallas_equals_xla_in_outputs_and_gradients(name):
    """Every method with a kernel path computes what its XLA path computes (causal too, where supported)."""
    assert_same_as_xla(name, masked_loss_value_and_grads(name, "pallas"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in KERNEL_CHECKED if name != "mamba"])
def test_every_backend_reachable_here_equals_xla(name):
    """The Mosaic TPU backend (TPU interpret mode on this CPU) against the XLA path, like the Triton kernels
    above; a method whose call it cannot take falls back to XLA and says why (then nothing is compared). Mamba's
    scan (43 s interpreted) is checked on this backend directly, in tests/test_kernels_tpu_linear.py."""
    from effjax.kernels import dispatch

    got = masked_loss_value_and_grads(name, "mosaic_tpu,xla", jitted=False)
    choice = next(c for where, c in dispatch.choices().items() if where == name or where.startswith(name))
    if choice.backend == "xla":
        pytest.skip(f"mosaic_tpu cannot run {name}'s call: {choice.skipped}")
    assert_same_as_xla(name, got)


@pytest.mark.parametrize("name", tiered(KERNEL_CHECKED, ("softmax", "block_local")))
def test_impl_pallas_applies_attention_dropout_in_training_only(name):
    q, k, v = qkv(9)
    module = attention.make(name, impl="pallas", dropout_rate=0.3, **small_params(name))
    variables = module.init(jax.random.key(0), q, k, v, mask=MASK)

    def apply(vs, q, k, v, key):
        return module.apply(vs, q, k, v, mask=MASK, deterministic=False, rngs={"dropout": key})

    train = jit(apply)(variables, q, k, v, jax.random.key(1))
    evaluation = jit(lambda vs, q, k, v: module.apply(vs, q, k, v, mask=MASK))(variables, q, k, v)
    assert np.all(np.isfinite(train))
    grads = jit(jax.grad(lambda *a: jnp.sum(apply(*a) ** 2), argnums=(1, 2, 3)))(variables, q, k, v,
                                                                                  jax.random.key(1))
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert (float(jnp.abs(train - evaluation).max()) > 1e-3) == declares(name, "dropout")


# A wrong declaration must fail the check of the flag it gets wrong, in both directions: claimed but refused,
# and disclaimed but working.
WRONG = [
    ("bigbird", "causal", test_causal_never_reads_the_future_where_declared_else_refused),
    ("softmax", "causal", test_causal_never_reads_the_future_where_declared_else_refused),
    ("linformer", "segments", test_segments_are_isolated_where_declared_else_refused),
    ("softmax", "segments", test_segments_are_isolated_where_declared_else_refused),
    ("bigbird", "cross", test_cross_attention_ignores_padded_keys_where_declared_else_refused),
    ("softmax", "cross", test_cross_attention_ignores_padded_keys_where_declared_else_refused),
    ("softmax", "mask", test_padded_tokens_do_not_change_real_outputs_where_declared_else_refused),
    ("essa", "dropout", test_dropout_acts_in_training_only_where_declared),
    ("softmax", "dropout", test_dropout_acts_in_training_only_where_declared),
    ("histogram", "pallas", test_registered_name_is_a_method_module),
    ("softmax", "pallas", test_registered_name_is_a_method_module),
    ("softmax", "decode", test_prefill_then_steps_equal_the_forward_pass_where_decode_is_declared_else_refused),
    ("bigbird", "decode", test_prefill_then_steps_equal_the_forward_pass_where_decode_is_declared_else_refused),
    # (extend disclaimed cannot work: decoding.check_call refuses a chunk by the declaration itself)
    ("bigbird", "extend", test_prefill_then_extends_equal_the_forward_pass_where_extend_is_declared_else_refused),
    ("softmax", "key_bias", test_key_bias_acts_as_duplicated_keys_where_declared_else_refused),
    ("softmax", "grouped_kv", test_grouped_kv_heads_act_as_repeated_heads_where_declared_else_refused),
    ("bigbird", "grouped_kv", test_grouped_kv_heads_act_as_repeated_heads_where_declared_else_refused),
    ("bigbird", "key_bias", test_key_bias_acts_as_duplicated_keys_where_declared_else_refused),
]


@pytest.mark.parametrize("name,flag,check", WRONG, ids=[f"{name}-{flag}" for name, flag, _ in WRONG])
def test_a_wrong_declaration_fails_its_check(monkeypatch, name, flag, check):
    module = importlib.import_module(f"effjax.attention.{name}")
    wrong = dataclasses.replace(module.CAPABILITIES, **{flag: not getattr(module.CAPABILITIES, flag)})
    monkeypatch.setattr(module, "CAPABILITIES", wrong)
    with pytest.raises(AssertionError):
        check(name)
