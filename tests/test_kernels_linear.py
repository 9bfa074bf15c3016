"""kernels.linear_attention (interpret mode on CPU) against plain-JAX references: outputs and gradients,
causal/bidirectional, decay, padding mask, awkward lengths, bfloat16, errors, and impl="pallas" through modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_tree_close, jit, lengths_mask, triton_calls, value_and_grads_of
from kernel_checks import linear_inputs as inputs

from effjax.attention import cosformer, kernel_attention, linear_elu, performer
from effjax.kernels import linear_attention as la

CASES = [  # causal, lq, lk, chunk, decay ("head" | "step" | None), normalize, mask lengths
    (False, 37, 37, 16, None, True, [30, 37]),
    (True, 37, 37, 16, None, True, [30, 37]),
    (True, 37, 37, 16, "step", True, None),
    (True, 37, 37, 16, "head", False, [25, 37]),
    (False, 13, 29, 16, None, False, None),
    (True, 13, 29, 16, "step", True, None),  # q_len < kv_len: end aligned
    (True, 29, 13, 32, None, True, None),  # q_len > kv_len, a single chunk
    (True, 16, 16, 16, None, True, None),  # exactly one block
]


@pytest.mark.parametrize("causal,lq,lk,chunk,decay,normalize,lengths", slow_after(CASES, keep=2))
def test_outputs_and_gradients_equal_reference(causal, lq, lk, chunk, decay, normalize, lengths):
    phi_q, phi_k, v, key = inputs(0, lq=lq, lk=lk)
    mask = None if lengths is None else lengths_mask(lengths, lk)
    args = [phi_q, phi_k, v]
    if decay == "head":
        args.append(jnp.array([0.9, 0.6]))
    elif decay == "step":
        args.append(jax.nn.sigmoid(2.0 + jax.random.normal(key, (2, lk, 2))))
    opts = dict(causal=causal, normalize=normalize, mask=mask)

    def kernel(*a):
        return la.chunked_linear_attention(*a[:3], decay=a[3] if decay else None, chunk_size=chunk, **opts)

    def ref(*a):
        return la.reference(*a[:3], decay=a[3] if decay else None, **opts)

    cot = jax.random.normal(jax.random.key(7), (2, lq, 2, 8))
    out, grads = value_and_grads_of(kernel, args, cot)
    want, want_grads = value_and_grads_of(ref, args, cot)
    assert out.shape == (2, lq, 2, 8) and out.dtype == jnp.float32
    assert_tree_close(out, want, 1e-5, 1e-5)
    assert_tree_close(grads, want_grads, 1e-4, 1e-5)


@pytest.mark.parametrize("decay", slow_after([None, "step"]))
def test_packed_segments_reset_the_state_and_match_the_segment_masked_reference(decay):
    # Segments of 5, 14 and 18 tokens: starts inside and at the edge of the 16-token chunks.
    phi_q, phi_k, v, key = inputs(3)
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3], [4, 4, 5]], [5, 14, 18], axis=1))
    mask = lengths_mask([37, 33], 37)
    gates = jax.nn.sigmoid(2.0 + jax.random.normal(key, (2, 37, 2))) if decay else None

    def kernel(q, k, v):
        return la.chunked_linear_attention(q, k, v, causal=True, decay=gates, chunk_size=16, mask=mask,
                                           segment_ids=segment_ids)

    def ref(q, k, v):
        return la.reference(q, k, v, causal=True, decay=gates, mask=mask, segment_ids=segment_ids)

    cot = jax.random.normal(jax.random.key(7), (2, 37, 2, 8))
    out, grads = value_and_grads_of(kernel, [phi_q, phi_k, v], cot)
    want, want_grads = value_and_grads_of(ref, [phi_q, phi_k, v], cot)
    assert_tree_close(out, want, 1e-5, 1e-5)
    assert_tree_close(grads, want_grads, 1e-4, 1e-5)
    # The first segment's outputs do not change when a later segment's keys do.
    later = v.at[:, 5:].set(0.0)
    np.testing.assert_allclose(kernel(phi_q, phi_k, later)[0, :5], out[0, :5], atol=1e-6)
    with pytest.raises(ValueError, match="segment_ids .* need causal self-attention"):
        la.chunked_linear_attention(phi_q, phi_k, v, segment_ids=segment_ids)


@pytest.mark.parametrize("backend,normalize", slow_after([("triton", False), ("triton", True), ("mosaic_tpu", True)]))
def test_a_sequence_run_in_two_calls_with_the_state_carried_equals_one_call(backend, normalize):
    from effjax.kernels import tpu_linear

    kernel = {"triton": la, "mosaic_tpu": tpu_linear}[backend]
    phi_q, phi_k, v, key = inputs(5, lq=40, lk=40)
    gates = jax.nn.sigmoid(2.0 + jax.random.normal(key, (2, 40, 2)))
    mask = lengths_mask([40, 29], 40)
    opts = dict(causal=True, chunk_size=16, normalize=normalize)

    def whole(q, k, v):
        return kernel.chunked_linear_attention(q, k, v, decay=gates, mask=mask, **opts)

    def halves(q, k, v, cut=23):  # the cut is inside a chunk
        first, state = kernel.chunked_linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], decay=gates[:, :cut],
                                                   mask=mask[:, :cut], return_state=True, **opts)
        second, final = kernel.chunked_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay=gates[:, cut:],
                                                    mask=mask[:, cut:], initial_state=state, return_state=True,
                                                    **opts)
        return jnp.concatenate([first, second], axis=1), final

    if backend == "triton" and not normalize:  # the default tier's case: outputs only (compiles half as much)
        assert_tree_close(halves(phi_q, phi_k, v)[0], whole(phi_q, phi_k, v), 1e-5, 1e-5)
    else:
        cot = jax.random.normal(jax.random.key(7), (2, 40, 2, 8))
        out, grads = value_and_grads_of(whole, [phi_q, phi_k, v], cot)
        split, split_grads = value_and_grads_of(lambda *a: halves(*a)[0], [phi_q, phi_k, v], cot)
        assert_tree_close(split, out, 1e-5, 1e-5)
        assert_tree_close(split_grads, grads, 1e-4, 1e-5)
    # The final state is the decayed sum over every real key: a query after the sequence reads it.
    final = halves(phi_q, phi_k, v)[1]
    cum = jnp.cumsum(jnp.log(gates), axis=1)
    weight = jnp.exp(cum[:, -1:] - cum) * mask[:, :, None]
    kv = jnp.einsum("blh,blhm,blhd->bhmd", weight, phi_k, v, precision="highest")
    np.testing.assert_allclose(final.kv, kv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.k_sum, jnp.einsum("blh,blhm->bhm", weight, phi_k), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="initial_state and return_state need causal self-attention"):
        kernel.chunked_linear_attention(phi_q, phi_k, v, return_state=True)


@pytest.mark.parametrize("causal", slow_after([True, False]))
def test_normalized_equals_kernel_attention_and_ignores_padded_keys(causal):
    phi_q, phi_k, v, _ = inputs(1, lq=45, lk=45, m=6, dv=5)
    mask = lengths_mask([33, 45], 45)
    out = jit(lambda *a: la.chunked_linear_attention(*a, causal=causal, chunk_size=16, mask=mask))(phi_q, phi_k, v)
    want = kernel_attention.normalized_attention(phi_q, phi_k, v, causal=causal, mask=mask, chunk_size=16)
    assert_tree_close(out, want, 1e-5, 1e-6)
    noisy = jnp.where(mask[:, :, None, None], v, 1e3)  # padded values must not leak
    out2 = jit(lambda *a: la.chunked_linear_attention(*a, causal=causal, chunk_size=16, mask=mask))(
        phi_q, phi_k, noisy)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


def test_value_blocks_split_the_state_exactly():
    phi_q, phi_k, v, key = inputs(2, lq=40, lk=40, m=16, dv=32)
    decay = jax.nn.sigmoid(2.0 + jax.random.normal(key, (2, 40, 2)))
    cot = jax.random.normal(jax.random.key(3), v.shape)

    def kernel(block):
        return lambda q, k, v, d: la.chunked_linear_attention(q, k, v, decay=d, causal=True, chunk_size=16,
                                                              block_v=block)

    whole = value_and_grads_of(kernel(None), [phi_q, phi_k, v, decay], cot)
    split = value_and_grads_of(kernel(16), [phi_q, phi_k, v, decay], cot)
    assert_tree_close(split, whole, 1e-5, 1e-6)


@pytest.mark.parametrize("causal", slow_after([True, False]))
def test_bfloat16_matches_float32_reference(causal):
    phi_q, phi_k, v, _ = inputs(4, lq=40, lk=40, dtype=jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(5), (2, 40, 2, 8))
    kernel = lambda *a: la.chunked_linear_attention(*a, causal=causal, chunk_size=16)
    ref = lambda *a: la.reference(*(x.astype(jnp.float32) for x in a), causal=causal)
    out, grads = value_and_grads_of(kernel, [phi_q, phi_k, v], cot)
    want, want_grads = value_and_grads_of(ref, [phi_q, phi_k, v], cot)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_tree_close(out, want, 2e-2, 2e-2)
    assert_tree_close(grads, want_grads, 3e-2, 3e-2)


def test_clear_errors():
    phi_q, phi_k, v, _ = inputs(5, lq=8, lk=8)
    call = la.chunked_linear_attention
    with pytest.raises(ValueError, match="chunked_linear_attention: chunk_size must be a power of two"):
        call(phi_q, phi_k, v, chunk_size=24)
    with pytest.raises(ValueError, match="decay needs causal=True"):
        call(phi_q, phi_k, v, decay=jnp.ones(2))
    with pytest.raises(ValueError, match="decay must have shape"):
        call(phi_q, phi_k, v, causal=True, decay=jnp.ones(3))
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        call(phi_q.astype(jnp.int32), phi_k, v)
    with pytest.raises(ValueError, match="mask must have shape"):
        call(phi_q, phi_k, v, mask=jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="feature dim 300 pads to 512"):
        call(jnp.ones((1, 8, 1, 300)), jnp.ones((1, 8, 1, 300)), jnp.ones((1, 8, 1, 4)))
    with pytest.raises(ValueError, match="do not agree"):
        call(phi_q, phi_k[..., :4], v)


# --- per-channel decays (GLA, HGRN2): log_decay [b, kv_len, h, m] -----------------------------------------------

def channel_log_decay(key, shape, low=-1.0):
    """Per-channel log decays in [low, 0] (low=-5: strong decays, a weight of e^-80 across one sub-block)."""
    return jax.random.uniform(key, shape, minval=low, maxval=0.0)


def recurrence(phi_q, phi_k, v, log_decay, normalize):
    """float64 token recurrence: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, z_t = exp(g_t) z_{t-1} + k_t, out_t =
    S_t^T q_t (/ q_t . z_t); returns (out, S, z) after the last token."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v, log_decay))
    batch, length, heads, m = q.shape
    state, z = np.zeros((batch, heads, m, v.shape[-1])), np.zeros((batch, heads, m))
    out = np.zeros(v.shape)
    for t in range(length):
        decay = np.exp(g[:, t])
        state = decay[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = decay * z + k[:, t]
        out[:, t] = np.einsum("bhm,bhmd->bhd", q[:, t], state)
        if normalize:
            out[:, t] /= np.einsum("bhm,bhm->bh", q[:, t], z)[..., None]
    return out, state, z


CHANNEL_CASES = [  # lq, lk, chunk, normalize, low, segments, mask lengths
    (37, 37, 32, False, -5.0, True, None),  # strong decays, segments, 2 chunks x 2 sub-blocks, length off the chunk
    (37, 37, 16, True, -1.0, False, [30, 37]),  # normalized, padding mask, one sub-block per chunk
    (13, 29, 16, True, -1.0, False, None),  # q_len < kv_len: end aligned
    (29, 13, 32, False, -1.0, False, None),  # q_len > kv_len: empty keys in front
    (100, 100, 64, True, -5.0, True, [100, 77]),  # 4 sub-blocks per chunk, strong, normalized
]


@pytest.mark.parametrize("lq,lk,chunk,normalize,low,segments,lengths", slow_after(CHANNEL_CASES))
def test_per_channel_decay_equals_reference(lq, lk, chunk, normalize, low, segments, lengths):
    phi_q, phi_k, v, key = inputs(12, lq=lq, lk=lk)
    log_decay = channel_log_decay(key, phi_k.shape, low)
    ids = jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [5, 14, lk - 19], axis=1)) if segments else None
    opts = dict(causal=True, normalize=normalize, segment_ids=ids,
                mask=None if lengths is None else lengths_mask(lengths, lk))
    kernel = lambda *a: la.chunked_linear_attention(*a[:3], log_decay=a[3], chunk_size=chunk, **opts)
    ref = lambda *a: la.reference(*a[:3], log_decay=a[3], **opts)
    cot = jax.random.normal(jax.random.key(7), (2, lq, 2, 8))
    out, grads = value_and_grads_of(kernel, [phi_q, phi_k, v, log_decay], cot)
    want, want_grads = value_and_grads_of(ref, [phi_q, phi_k, v, log_decay], cot)
    assert_tree_close(out, want, 1e-5, 1e-5)  # finite too: no NaN/inf from the strong decays
    assert_tree_close(grads, want_grads, 1e-4, 1e-5)


def test_per_channel_decay_matches_the_recurrence_and_a_per_head_decay_broadcast():
    phi_q, phi_k, v, key = inputs(13, lq=40, lk=40)
    keys = jax.random.split(key)
    fn = jit(lambda q, k, v, g: la.chunked_linear_attention(q, k, v, causal=True, log_decay=g, chunk_size=32))
    per_channel = channel_log_decay(keys[0], phi_k.shape, -3.0)
    assert_tree_close(fn(phi_q, phi_k, v, per_channel), recurrence(phi_q, phi_k, v, per_channel, True)[0], 1e-5, 1e-5)
    per_head = channel_log_decay(keys[1], phi_k.shape[:3])
    broadcast = jnp.broadcast_to(per_head[..., None], phi_k.shape)
    np.testing.assert_allclose(fn(phi_q, phi_k, v, broadcast), fn(phi_q, phi_k, v, per_head), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decay needs causal=True"):
        la.chunked_linear_attention(phi_q, phi_k, v, log_decay=per_channel)
    with pytest.raises(ValueError, match=r"decay must have shape .* \[batch, kv_len, heads, m\]"):
        la.chunked_linear_attention(phi_q, phi_k, v, causal=True, log_decay=per_channel[..., :3])


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_per_channel_decay_state_carried_across_calls(normalize):
    # Two calls with the state carried equal one call and the float64 recurrence (outputs, gradients including the
    # decay's, and the final state's per-channel decay); segments, the cut inside a segment and a chunk.
    phi_q, phi_k, v, key = inputs(14, lq=40, lk=40)
    log_decay = channel_log_decay(key, phi_k.shape, -2.0)
    ids = jnp.asarray(np.repeat([[0, 1], [2, 3]], [9, 31], axis=1))
    opts = dict(causal=True, chunk_size=16, normalize=normalize)

    def whole(q, k, v, g):
        return la.chunked_linear_attention(q, k, v, log_decay=g, segment_ids=ids, **opts)

    def halves(q, k, v, g, cut=23):
        first, state = la.chunked_linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], log_decay=g[:, :cut],
                                                   segment_ids=ids[:, :cut], return_state=True, **opts)
        second, final = la.chunked_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], log_decay=g[:, cut:],
                                                    segment_ids=ids[:, cut:], initial_state=state, return_state=True,
                                                    **opts)
        return jnp.concatenate([first, second], axis=1), final

    cot = jax.random.normal(jax.random.key(7), v.shape)
    args = [phi_q, phi_k, v, log_decay]
    out, grads = value_and_grads_of(whole, args, cot)
    split, split_grads = value_and_grads_of(lambda *a: halves(*a)[0], args, cot)
    assert_tree_close(split, out, 1e-5, 1e-5)
    assert_tree_close(split_grads, grads, 1e-4, 1e-5)
    ref = lambda *a: la.reference(*a[:3], log_decay=a[3], causal=True, normalize=normalize, segment_ids=ids)
    assert_tree_close(grads, value_and_grads_of(ref, args, cot)[1], 1e-4, 1e-5)
    reset = jnp.where(jnp.arange(40) == 9, jnp.log(la.FLOOR), 0.0)[None, :, None, None]  # the second segment's start
    want, kv, k_sum = recurrence(phi_q, phi_k, v, log_decay + reset, normalize)
    assert_tree_close(out, want, 1e-5, 1e-5)  # atol relative to the largest output: the unnormalized sums cancel
    assert_tree_close(tuple(jit(halves)(*args)[1]), (kv, k_sum), 1e-5, 1e-5)


@pytest.mark.slow
def test_per_channel_decay_value_blocks_and_bfloat16():
    phi_q, phi_k, v, key = inputs(15, lq=40, lk=40, m=16, dv=32)
    log_decay = channel_log_decay(key, phi_k.shape, -2.0)
    cot = jax.random.normal(jax.random.key(3), v.shape)

    def kernel(block):
        return lambda q, k, v, g: la.chunked_linear_attention(q, k, v, log_decay=g, causal=True, chunk_size=32,
                                                              block_v=block)

    whole = value_and_grads_of(kernel(None), [phi_q, phi_k, v, log_decay], cot)
    assert_tree_close(value_and_grads_of(kernel(16), [phi_q, phi_k, v, log_decay], cot), whole, 1e-5, 1e-6)
    half = [x.astype(jnp.bfloat16) for x in (phi_q, phi_k, v)] + [log_decay]
    out, grads = value_and_grads_of(kernel(None), half, cot)
    want, want_grads = value_and_grads_of(lambda *a: la.reference(*a[:3], log_decay=a[3], causal=True),
                                          [x.astype(jnp.float32) for x in half], cot)
    assert out.dtype == jnp.bfloat16
    assert_tree_close(out, want, 2e-2, 2e-2)
    assert_tree_close(grads, want_grads, 3e-2, 3e-2)


# --- impl="pallas" through the attention modules --------------------------------------------------

def module_inputs(seed, length=40):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (2, length, 2, 8)) for kk in keys]


@pytest.mark.parametrize("name,causal", slow_after([("linear_elu", True), ("linear_elu", False), ("cosformer", True)]))
def test_module_pallas_equals_xla(name, causal):
    module = {"linear_elu": linear_elu, "cosformer": cosformer}[name].Attention
    q, k, v = module_inputs(6)
    mask = lengths_mask([31, 40], 40)
    cot = jax.random.normal(jax.random.key(8), q.shape)
    results = []
    for impl in ("xla", "pallas"):
        m = module(chunk_size=16, impl=impl)
        fn = lambda q, k, v, m=m: m.apply({}, q, k, v, mask=mask, causal=causal)
        results.append(value_and_grads_of(fn, [q, k, v], cot))
    assert_tree_close(results[1], results[0], 1e-5, 1e-5)


@pytest.mark.parametrize("causal", slow_after([True, False], keep=0))
def test_performer_pallas_equals_xla(causal):
    q, k, v = module_inputs(11)
    mask = lengths_mask([31, 40], 40)
    variables = performer.Attention(num_features=16, chunk_size=16).init(jax.random.key(0), q, k, v)
    outs = [performer.Attention(num_features=16, chunk_size=16, impl=impl).apply(variables, q, k, v, mask=mask,
                                                                                causal=causal)
            for impl in ("xla", "pallas")]
    np.testing.assert_allclose(outs[1][0, :31], outs[0][0, :31], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", slow_after([True, False]))
def test_key_log_scale_folds_into_the_kernel(causal):
    # Performer-style key scales up to 300 (exp overflows float32), masked keys, chunk 4 rounded up to 16.
    phi_q, phi_k, v, key = inputs(9, lq=37, lk=37)
    scale = 300.0 * jax.random.uniform(key, (2, 37, 2))
    mask = lengths_mask([29, 37], 37)
    cot = jax.random.normal(jax.random.key(10), v.shape)
    results = []
    for impl in ("xla", "pallas"):
        fn = lambda *a, impl=impl: kernel_attention.normalized_attention(
            *a, mask=mask, causal=causal, key_log_scale=scale, chunk_size=4, impl=impl)
        results.append(value_and_grads_of(fn, [phi_q, phi_k, v], cot))
    assert_tree_close(results[1], results[0], 1e-4, 1e-5)


def test_impl_switch_errors():
    q, k, v = module_inputs(11, length=8)
    with pytest.raises(ValueError, match="linear_elu: Unknown kernel backend"):
        linear_elu.attend(q, k, v, impl="cuda")
    with pytest.raises(NotImplementedError, match=r"no backend in impl='pallas' can run this linear call "
                       r"\(triton: segment_ids"):
        kernel_attention.normalized_attention(q, k, v, segment_ids=jnp.zeros((2, 8), jnp.int32), impl="pallas",
                                              method="scattered_linear")


LOWERING_CASES = [(True, "step"), (True, "channel"), (False, None), (True, None)]


@pytest.mark.parametrize("causal,decay", slow_after(LOWERING_CASES, keep=2))
def test_kernels_lower_to_triton(causal, decay):
    # Lowering only (no GPU needed): Pallas -> Triton IR for forward and backward at a bench-like tile shape.
    shape = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    gate = {"step": jax.ShapeDtypeStruct((2, 256, 2), jnp.float32), "channel": jax.ShapeDtypeStruct(
        (2, 256, 2, 64), jnp.float32)}.get(decay)
    fn = lambda q, k, v, g: la.chunked_linear_attention(q, k, v, causal=causal, decay=g, interpret=False)
    grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    assert triton_calls(grad, shape, shape, shape, gate) == 2  # forward and backward kernels
