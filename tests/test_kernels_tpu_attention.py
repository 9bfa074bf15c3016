"""The splash-attention backend (``kernels/tpu_attention.py``, ``mosaic_tpu``) in interpret mode on CPU against the
plain-JAX references, outputs and gradients, at lengths that are not multiples of splash's 128-wide tiles, GQA/MQA,
head_dim below 128 (zero-padded), padding + segments + causal; its refusals; and its lowering for TPU from this
CPU (``jax.export(..., platforms=["tpu"])``: a Pallas-to-Mosaic rejection fails the test).

Interpreted splash is slow (a grid step costs milliseconds), so shapes are small and all but one fast check sit
in the slow tier.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import slow_after
from jax import export
from jax.experimental.pallas import tpu as pltpu
from kernel_checks import assert_close, assert_tree_close, inputs, value_and_grads, value_and_grads_of

from effjax.kernels import tpu_attention as tpu
from effjax.kernels.block_sparse import reference as block_reference
from effjax.kernels.block_sparse import window_global_reference
from effjax.kernels.flash_attention import BlockSizes, reference

TPU_CALL = "tpu_custom_call"


def padding_mask(lk):
    return np.arange(lk)[None, :] < np.array([[lk - 37], [lk]])


def segments(length):
    """Uneven packed segments: row 0 has three (lengths 5, 20, rest), row 1 one."""
    row0 = np.concatenate([np.full(5, 1), np.full(20, 2), np.full(length - 25, 3)])
    return np.stack([row0, np.ones(length, int)]).astype(np.int32)


def resolve(kwargs, lq, lk):
    out = dict(kwargs)
    if out.get("mask") == "pad":
        out["mask"] = padding_mask(lk)
    if out.get("segment_ids") == "seg":
        out["segment_ids"] = segments(lq)
    return out


def check(fn, ref, q, k, v, ct, tol):
    """fn's output and gradients against ref's (float32 inputs), relative to each gradient's largest entry."""
    out, grads = value_and_grads(fn, q, k, v, ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = value_and_grads(ref, *f32, ct)
    assert out.shape == q.shape and out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    errors = [float(np.max(np.abs(np.asarray(out, np.float32) - ref_out)))]
    assert_close(out, ref_out, tol, tol)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(r))))
        errors.append(float(np.max(np.abs(np.asarray(g, np.float32) - r))) / scale)
        assert_close(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, 0, tol)
    print("max errors (out, dq, dk, dv):", ", ".join(f"{e:.1e}" for e in errors))


# (name, q_len, kv_len, heads, kv_heads, head_dim, call kwargs)
CASES = [
    ("gqa_padding_segments_causal", 200, 200, 4, 2, 64, dict(causal=True, mask="pad", segment_ids="seg")),
    ("mqa_cross_causal_window_queries_before_every_key", 300, 140, 2, 1, 128,
     dict(causal=True, window=40, mask="pad")),
    ("bidirectional_window_segments", 256, 256, 2, 2, 32, dict(window=17, segment_ids="seg")),
    ("causal_queries_before_every_key_no_masks", 300, 140, 2, 2, 64, dict(causal=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_float32_matches_reference(case):
    _, lq, lk, heads, kv_heads, d, kwargs = case
    q, k, v, ct = inputs(0, lq, lk, heads, kv_heads, d)
    kwargs = resolve(kwargs, lq, lk)
    check(lambda q, k, v: tpu.attention(q, k, v, **kwargs), lambda q, k, v: reference(q, k, v, **kwargs),
          q, k, v, ct, 1e-5)


@pytest.mark.slow
def test_attention_bfloat16_matches_float32_reference():
    q, k, v, ct = inputs(1, 200, heads=4, kv_heads=2, d=64, dtype=jnp.bfloat16)
    kwargs = dict(causal=True, mask=padding_mask(200), segment_ids=segments(200))
    check(lambda q, k, v: tpu.attention(q, k, v, **kwargs), lambda q, k, v: reference(q, k, v, **kwargs),
          q, k, v, ct, 2e-2)


@pytest.mark.slow
def test_block_sparse_per_head_layout_with_empty_rows_matches_reference():
    # 4 x 4 blocks of 64 over length 200: head 0 local + first column, head 1 a row with no block and a row whose
    # only block lies in the future (causal): those queries get the reference's mean of all values.
    layout = np.zeros((2, 4, 4), bool)
    layout[0] = np.eye(4, dtype=bool) | (np.arange(4)[None, :] == 0)
    layout[1, 0, 0] = layout[1, 1, 2] = layout[1, 3, 1:] = True
    q, k, v, ct = inputs(2, 200, heads=2, d=64)
    kwargs = dict(block_size=64, causal=True, mask=padding_mask(200))
    check(lambda q, k, v: tpu.block_sparse(q, k, v, layout, **kwargs),
          lambda q, k, v: block_reference(q, k, v, layout, **kwargs), q, k, v, ct, 1e-5)


@pytest.mark.slow
def test_window_global_matches_reference():
    flags = np.zeros((2, 200), bool)
    flags[:, [0, 77]] = True
    q, k, v, ct = inputs(3, 200, heads=4, kv_heads=2, d=64)
    kwargs = dict(window=9, global_tokens=flags, mask=padding_mask(200), segment_ids=segments(200))
    check(lambda q, k, v: tpu.window_global(q, k, v, **kwargs),
          lambda q, k, v: window_global_reference(q, k, v, **kwargs), q, k, v, ct, 1e-5)


def emptying_mask_and_segments(length):
    """Row 0: no real key at all; row 1: segment 2 (positions 5..24) has all its keys masked."""
    mask = np.ones((2, length), bool)
    mask[0] = False
    mask[1, 5:25] = False
    return mask, segments(length)[[1, 0]]


EMPTY_ROWS = [
    ("attention", lambda q, k, v, **kw: tpu.attention(q, k, v, causal=True, window=30, **kw),
     lambda q, k, v, **kw: reference(q, k, v, causal=True, window=30, **kw)),
    ("window_global", lambda q, k, v, **kw: tpu.window_global(q, k, v, window=4, global_tokens=GLOBAL, **kw),
     lambda q, k, v, **kw: window_global_reference(q, k, v, window=4, global_tokens=GLOBAL, **kw)),
    ("block_sparse", lambda q, k, v, **kw: tpu.block_sparse(q, k, v, LAYOUT, causal=True, **kw),
     lambda q, k, v, **kw: block_reference(q, k, v, LAYOUT, causal=True, **kw)),
]
LAYOUT = np.stack([np.eye(4, dtype=bool) | np.eye(4, k=-2, dtype=bool), np.tril(np.ones((4, 4), bool))])
GLOBAL = np.zeros((2, 200), bool)
GLOBAL[:, 150] = True


@pytest.mark.slow
@pytest.mark.parametrize("op, fn, ref", EMPTY_ROWS, ids=[e[0] for e in EMPTY_ROWS])
def test_rows_whose_keys_are_all_masked_average_all_values_like_the_reference(op, fn, ref):
    # Splash cannot tell such a row (its masked logits share one finite value); the backend finds it by a range
    # query over the keys sorted by segment and gives the reference's answer, with no q/k gradient.
    q, k, v, ct = inputs(6, 200, heads=2, d=64)
    mask, seg = emptying_mask_and_segments(200)
    check(lambda q, k, v: fn(q, k, v, mask=mask, segment_ids=seg),
          lambda q, k, v: ref(q, k, v, mask=mask, segment_ids=seg), q, k, v, ct, 1e-5)


@pytest.mark.slow
def test_tpu_interpret_mode_one_example_matches_reference():
    # The TPU simulator (stricter than interpret=True's HLO interpreter) cannot run a vmapped splash call (its
    # dimension semantics miss the batch axis), so one example, which the backend runs without vmap.
    q, k, v, ct = (x[:1] for x in inputs(5, 200, heads=4, kv_heads=2, d=64))
    kwargs = dict(causal=True, mask=padding_mask(200)[:1], segment_ids=segments(200)[:1])
    with pltpu.force_tpu_interpret_mode():
        check(lambda q, k, v: tpu.attention(q, k, v, **kwargs), lambda q, k, v: reference(q, k, v, **kwargs),
              q, k, v, ct, 1e-5)


RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("length", None))


@pytest.mark.slow
def test_per_shard_with_per_head_masks_equals_the_unsharded_call():
    # Heads split over tensor = 2: splash's mask tables are built for two head shards and split with the heads.
    layout = np.ones((4, 2, 2), bool)
    layout[1, 0, 1] = layout[2, 1, 0] = False
    q, k, v, ct = inputs(4, 256, heads=4, kv_heads=2, d=128)
    mask = padding_mask(256)

    def fn(q, k, v):
        return tpu.block_sparse(q, k, v, layout, block_size=128, mask=mask)

    want = value_and_grads_of(fn, (q, k, v), ct)
    the_mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(the_mesh), nn.logical_axis_rules(RULES):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        got = value_and_grads_of(fn, (q, k, v), ct)
    assert_tree_close(got, want, 1e-6, 1e-6)


def test_supports_names_what_it_refuses():
    q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    base = dict(q=q, k=q, v=q, interpret=True)
    flags = np.zeros((2, 256), bool)
    flags[0, 3] = True
    assert tpu.supports("attention", dict(base, causal=True, mask=np.ones((2, 256), bool))) is None
    assert tpu.supports("attention", dict(base, dropout_rate=0.1)) == "dropout"
    assert tpu.supports("block_sparse", dict(base, block_mask=np.ones((1, 4, 4), bool))) is None
    traced = jax.ShapeDtypeStruct((1, 4, 4), jnp.bool_)
    assert tpu.supports("block_sparse", dict(base, block_mask=traced)) == "traced block_mask"
    assert tpu.supports("window_global", dict(base, window=8, global_tokens=flags)) == \
        "global tokens that differ across the batch"
    assert tpu.supports("window_global", dict(base, window=8, global_tokens=flags[[0, 0]])) is None
    assert "float16" in tpu.supports("attention", dict(base, q=jax.ShapeDtypeStruct(q.shape, jnp.float16)))
    assert tpu.supports("linear", base).startswith("op 'linear'")
    if jax.default_backend() == "cpu":
        assert "TPU" in tpu.supports("attention", dict(base, interpret=False))
    assert set(tpu.OPS) == {"attention", "block_sparse", "window_global"} and tpu.PLATFORMS == ("tpu",)
    with pytest.raises(NotImplementedError, match="dropout"):
        tpu.attention(*(jnp.zeros((1, 8, 1, 8)),) * 3, dropout_rate=0.1, dropout_seed=np.zeros(2, np.uint32))


def lowered_for_tpu(fn, *args):
    """The StableHLO text of ``jax.export`` of jitted ``fn`` for TPU: Pallas lowers each kernel to Mosaic."""
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


EXPORTS = [
    ("attention", lambda q, k, v: tpu.attention(q, k, v, causal=True, mask=np.ones((2, 200), bool),
                                                segment_ids=np.ones((2, 200), np.int32), window=150,
                                                blocks=BlockSizes(128, 64, 64, 64), interpret=False)),
    ("block_sparse", lambda q, k, v: tpu.block_sparse(q, k, v, np.stack([np.tril(np.ones((4, 4), bool)),
                                                                         np.eye(4, dtype=bool)] * 2),
                                                      causal=True, interpret=False)),
    ("window_global", lambda q, k, v: tpu.window_global(q, k, v, window=16, global_tokens=np.eye(2, 200, dtype=bool)
                                                        [[0, 0]], interpret=False)),
]


@pytest.mark.parametrize("op, fn", slow_after(EXPORTS), ids=[e[0] for e in EXPORTS])
def test_forward_and_backward_lower_to_mosaic_for_tpu(monkeypatch, op, fn):
    monkeypatch.setattr(tpu, "_platform_ok", lambda *a: None)
    q = jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16)

    def grads(q, k, v):
        return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    assert lowered_for_tpu(fn, q, k, k).count(TPU_CALL) == 1
    assert lowered_for_tpu(grads, q, k, k).count(TPU_CALL) == 3  # forward with residuals, dK/dV, dQ
