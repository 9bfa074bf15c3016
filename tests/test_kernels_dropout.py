"""Attention dropout inside the Pallas kernels: the counter-based keep mask, and the kernels against a reference
that applies the same mask to the plain-JAX softmax weights (outputs and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_close, inputs, jit, triton_calls, value_and_grads

from effjax import attention
from effjax.kernels import block_sparse as bs
from effjax.kernels import dropout
from effjax.kernels.block_sparse import block_sparse_attention
from effjax.kernels.flash_attention import BlockSizes, flash_attention, reference

B16 = BlockSizes(16, 16, 16, 16)
SEED = dropout.seed_from_key(jax.random.key(3))


def test_keep_mask_has_the_rate_and_no_correlation_across_positions_heads_rows_and_seeds():
    rate = 0.2
    keep = np.asarray(dropout.keep_mask(SEED, 2, 4, 128, 160, rate))
    n = keep[0, 0].size
    sigma = np.sqrt(rate * (1 - rate) / keep.size)
    assert abs(keep.mean() - (1 - rate)) < 5 * sigma

    def corr(a, b):
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    bound = 5 / np.sqrt(n)
    assert corr(keep[0, 0], keep[0, 1]) < bound  # heads
    assert corr(keep[0, 0], keep[1, 0]) < bound  # batch rows
    assert corr(keep[0, 0, :, 1:], keep[0, 0, :, :-1]) < bound  # neighbouring keys
    assert corr(keep[0, 0, 1:], keep[0, 0, :-1]) < bound  # neighbouring queries
    other = np.asarray(dropout.keep_mask(dropout.seed_from_key(jax.random.key(4)), 2, 4, 128, 160, rate))
    assert corr(keep, other) < 5 / np.sqrt(keep.size)
    np.testing.assert_array_equal(keep, np.asarray(dropout.keep_mask(SEED, 2, 4, 128, 160, rate)))


def test_threshold_edges_and_bad_rate():
    assert np.asarray(dropout.keep_mask(SEED, 1, 1, 8, 8, 0.0)).all()
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        dropout.threshold(1.0)


def _mask_and_segments(length):
    mask = np.arange(length)[None, :] < np.array([[length - 5], [length]])
    seg = np.stack([np.repeat([1, 2, 3], [7, 15, length - 22]), np.ones(length, int)]).astype(np.int32)
    return mask, seg


@pytest.mark.parametrize("rate, kwargs, lq, heads, kv_heads", slow_after([
    (0.3, dict(causal=True, segments=True), 40, 2, 2),
    (0.5, dict(window=6, mask=True), 48, 4, 2),
    (0.1, dict(mask=True), 24, 2, 1),
]))
def test_flash_dropout_output_and_gradients_match_the_reference_with_the_same_keep_mask(rate, kwargs, lq, heads,
                                                                                       kv_heads):
    q, k, v, ct = inputs(11, lq, heads=heads, kv_heads=kv_heads)
    mask, seg = _mask_and_segments(lq)
    call = dict(causal=kwargs.get("causal", False), window=kwargs.get("window"),
                mask=mask if kwargs.get("mask") else None, segment_ids=seg if kwargs.get("segments") else None,
                dropout_rate=rate, dropout_seed=SEED)
    out, grads = value_and_grads(lambda q, k, v: flash_attention(q, k, v, blocks=B16, **call), q, k, v, ct)
    ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, **call), q, k, v, ct)
    assert_close(out, ref, 1e-5, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, 2e-5)
    no_drop = jit(lambda q, k, v: flash_attention(q, k, v, blocks=B16, **{**call, "dropout_rate": 0.0}))(q, k, v)
    assert float(jnp.abs(out - no_drop).max()) > 0.1  # dropout did something


def test_block_sparse_and_window_global_dropout_match_their_references():
    q, k, v, ct = inputs(12, 64)
    mask, seg = _mask_and_segments(64)
    layout = np.random.RandomState(0).rand(2, 4, 4) < 0.5
    layout[:, np.arange(4), np.arange(4)] = True
    call = dict(mask=mask, segment_ids=seg, dropout_rate=0.25, dropout_seed=SEED)
    out, grads = value_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, **call),
                                 q, k, v, ct)
    ref, ref_grads = value_and_grads(lambda q, k, v: bs.reference(q, k, v, layout, block_size=16, **call), q, k, v, ct)
    for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert_close(got, want, 1e-5, 2e-5)
    glob = np.zeros((2, 64), bool)
    glob[:, 0] = glob[1, 37] = True
    wg = dict(window=5, global_tokens=glob, causal=True, **call)
    out = jit(lambda q, k, v: bs.window_global_attention(q, k, v, blocks=B16, **wg))(q, k, v)
    assert_close(out, bs.window_global_reference(q, k, v, **wg), 1e-5, 1e-5)


def test_methods_under_pallas_take_dropout_deterministic_turns_it_off():
    q, k, v, _ = inputs(13, 32)
    module = attention.make("softmax", impl="pallas", dropout_rate=0.2)
    variables = module.init(jax.random.key(0), q, k, v)
    train = module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)})
    again = module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(1)})
    other = module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(2)})
    evaluation = module.apply(variables, q, k, v)
    np.testing.assert_array_equal(np.asarray(train), np.asarray(again))
    assert float(jnp.abs(train - other).max()) > 0.1
    assert_close(evaluation, reference(q, k, v), 1e-5, 1e-5)
    key = jax.random.key(5)
    direct = attention.softmax.attend(q, k, v, causal=True, dropout_rate=0.2, dropout_rng=key, impl="pallas")
    want = reference(q, k, v, causal=True, dropout_rate=0.2, dropout_seed=dropout.seed_from_key(key))
    assert_close(direct, want, 1e-5, 1e-5)


def test_dropout_errors_name_the_kernel():
    q, k, v, _ = inputs(14, 16)
    with pytest.raises(ValueError, match="flash_attention: dropout_rate 0.1 needs a dropout_seed"):
        flash_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"flash_attention: dropout_rate must be in \[0, 1\)"):
        flash_attention(q, k, v, dropout_rate=1.0, dropout_seed=SEED)


def test_dropout_kernels_lower_through_triton_for_cuda(monkeypatch):
    # Lowering only, no GPU needed: the uint32 hash must be expressible in Triton (shifts, wrapping products).
    from effjax.kernels import flash_attention as fa

    monkeypatch.setattr(fa, "_platform_ok", lambda *a: None)
    q = jax.ShapeDtypeStruct((2, 500, 4, 64), jnp.bfloat16)

    def grads(q, k, v):
        loss = lambda q, k, v: flash_attention(  # noqa: E731
            q, k, v, causal=True, blocks=fa.DEFAULT_BLOCKS["gpu"], interpret=False, dropout_rate=0.1,
            dropout_seed=SEED).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert triton_calls(grads, q, q, q) == 3  # forward, dQ, dK/dV
