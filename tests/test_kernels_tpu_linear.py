"""kernels.tpu_linear and kernels.tpu_scan (the mosaic_tpu backend) in TPU interpret mode on CPU against the
plain-JAX references: outputs and gradients at awkward shapes (lengths not multiples of the chunk, dims not multiples
of 128, several chunks and value/channel blocks), decay per head and per step, padding mask, keep/reset, bfloat16;
the backend contract; and Mosaic lowering for TPU from this CPU (forward and gradient), so that a rejected block
shape fails here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import export
from kernel_checks import assert_tree_close, lengths_mask, linear_inputs, scan_inputs, value_and_grads_of

from effjax.kernels import linear_attention as la
from effjax.kernels import selective_scan as ss
from effjax.kernels import tpu_linear, tpu_scan

MOSAIC = "tpu_custom_call"


def tpu_calls(fn, *args) -> int:
    """How many Mosaic kernels ``jax.export`` of jitted ``fn`` for TPU holds: lowering only, no TPU needed."""
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module().count(f"@{MOSAIC}(")


def decay_of(kind, key, lk, heads=2, m=8):
    if kind == "head":
        return jnp.array([0.9, 0.6][:heads])
    if kind == "channel":  # factors in [e^-1, 1] per feature channel
        return jnp.exp(jax.random.uniform(key, (2, lk, heads, m), minval=-1.0, maxval=0.0))
    return jax.nn.sigmoid(2.0 + jax.random.normal(key, (2, lk, heads)))


def check_linear(causal, lq, lk, chunk, decay, normalize, lengths, m=8, dv=8, dtype=jnp.float32, tol=(1e-5, 1e-4),
                 block_v=None):
    phi_q, phi_k, v, key = linear_inputs(0, lq=lq, lk=lk, m=m, dv=dv, dtype=dtype)
    mask = None if lengths is None else lengths_mask(lengths, lk)
    args = [phi_q, phi_k, v] + ([decay_of(decay, key, lk, m=m)] if decay else [])
    opts = dict(causal=causal, normalize=normalize, mask=mask)

    def kernel(*a):
        return tpu_linear.chunked_linear_attention(*a[:3], decay=a[3] if decay else None, chunk_size=chunk,
                                                   block_v=block_v, **opts)

    def ref(*a):
        return la.reference(*(x.astype(jnp.float32) for x in a[:3]), decay=a[3] if decay else None, **opts)

    cot = jax.random.normal(jax.random.key(7), (2, lq, 2, dv))
    out, grads = value_and_grads_of(kernel, args, cot)
    want, want_grads = value_and_grads_of(ref, args, cot)
    assert out.shape == (2, lq, 2, dv) and out.dtype == dtype
    assert all(g.dtype == a.dtype for g, a in zip(grads, args, strict=True))
    assert_tree_close(out, want, tol[0], tol[0])
    assert_tree_close(grads, want_grads, tol[1], tol[1])


LINEAR_CASES = [  # causal, lq, lk, chunk, decay ("head" | "step" | "channel" | None), normalize, mask lengths
    (True, 150, 150, 128, "step", True, [140, 150]),  # two chunks (the state crosses a boundary), padding mask
    (True, 150, 150, 128, "channel", True, [140, 150]),  # per channel: 8 sub-blocks per chunk, two chunks
    (True, 13, 29, 64, "channel", False, None),  # per channel, end aligned: one chunk of 32 rows (2 sub-blocks)
    (True, 150, 150, 128, "head", False, None),  # per-head decay over two chunks, numerator only
    (False, 150, 150, 128, None, True, [100, 150]),  # bidirectional over two chunks
    (True, 13, 29, 64, "head", False, None),  # one chunk of 32 rows; q_len < kv_len: end aligned
    (True, 29, 13, 64, None, True, None),  # q_len > kv_len
]


@pytest.mark.slow
@pytest.mark.parametrize("causal,lq,lk,chunk,decay,normalize,lengths", LINEAR_CASES)
def test_linear_equals_reference(causal, lq, lk, chunk, decay, normalize, lengths):
    check_linear(causal, lq, lk, chunk, decay, normalize, lengths)


@pytest.mark.slow
def test_linear_value_and_feature_blocks():
    # value dim 130 (+1 denominator column) pads to 256 lanes, here in two value blocks of 128 (by default one of
    # 256); feature dim 136 pads to 256.
    check_linear(True, 40, 40, 64, "step", True, [33, 40], m=136, dv=130, block_v=100)
    assert [tpu_linear.value_block(d) for d in (128, 256, 512, 640, 1024)] == [128, 256, 512, 128, 512]
    assert tpu_linear.value_block(256, 128) == 128 and tpu_linear.value_block(256, 384) == 256


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_linear_bfloat16(causal):
    check_linear(causal, 150, 150, 128, "step" if causal else None, True, [140, 150], dtype=jnp.bfloat16,
                 tol=(2e-2, 3e-2))


@pytest.mark.slow
def test_linear_per_channel_blocks_and_bfloat16():
    # feature dim 520 pads to 640 lanes: d phi_q and d phi_k (decay on their output channels) run in five channel
    # blocks of 128, each with its slice of the decay; then bfloat16 with a per-channel decay.
    check_linear(True, 40, 40, 64, "channel", True, [33, 40], m=520, dv=8)
    check_linear(True, 150, 150, 128, "channel", True, [140, 150], dtype=jnp.bfloat16, tol=(2e-2, 3e-2))


def per_channel_segments(length):
    return jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [5, 14, length - 19], axis=1))


def test_per_channel_linear_equals_reference():
    # One chunk of 48 rows (3 sub-blocks of 16), strong decays (down to e^-80 across a sub-block), segments.
    phi_q, phi_k, v, key = linear_inputs(4, lq=37, lk=37)
    log_decay = jax.random.uniform(key, phi_k.shape, minval=-5.0, maxval=0.0)
    opts = dict(causal=True, normalize=False, segment_ids=per_channel_segments(37))
    kernel = lambda q, k, v, g: tpu_linear.chunked_linear_attention(q, k, v, log_decay=g, **opts)
    ref = lambda q, k, v, g: la.reference(q, k, v, log_decay=g, **opts)
    cot = jax.random.normal(jax.random.key(3), v.shape)
    out, grads = value_and_grads_of(kernel, [phi_q, phi_k, v, log_decay], cot)
    want, want_grads = value_and_grads_of(ref, [phi_q, phi_k, v, log_decay], cot)
    assert_tree_close(out, want, 1e-5, 1e-5)
    assert_tree_close(grads, want_grads, 1e-4, 1e-5)


def test_per_channel_linear_equals_a_per_head_decay_broadcast():
    phi_q, phi_k, v, key = linear_inputs(5, lq=40, lk=40)
    per_head = jax.random.uniform(key, phi_k.shape[:3], minval=-1.0, maxval=0.0)
    fn = jax.jit(lambda q, k, v, g: tpu_linear.chunked_linear_attention(q, k, v, causal=True, log_decay=g))
    np.testing.assert_allclose(fn(phi_q, phi_k, v, jnp.broadcast_to(per_head[..., None], phi_k.shape)),
                               fn(phi_q, phi_k, v, per_head), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decay needs causal=True"):
        tpu_linear.chunked_linear_attention(phi_q, phi_k, v, log_decay=jnp.zeros(phi_k.shape))


@pytest.mark.slow
def test_linear_per_channel_state_carried_across_calls():
    # Two calls with the state carried (cut inside a chunk and a segment) equal one call and the reference.
    phi_q, phi_k, v, key = linear_inputs(6, lq=150, lk=150)
    log_decay = jax.random.uniform(key, phi_k.shape, minval=-2.0, maxval=0.0)
    ids = per_channel_segments(150)
    opts = dict(causal=True, chunk_size=128)

    def halves(q, k, v, g, cut=70):
        first, state = tpu_linear.chunked_linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], log_decay=g[:, :cut],
                                                           segment_ids=ids[:, :cut], return_state=True, **opts)
        second = tpu_linear.chunked_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], log_decay=g[:, cut:],
                                                     segment_ids=ids[:, cut:], initial_state=state, **opts)
        return jnp.concatenate([first, second], axis=1)

    ref = lambda q, k, v, g: la.reference(q, k, v, log_decay=g, causal=True, segment_ids=ids)
    cot = jax.random.normal(jax.random.key(3), v.shape)
    args = [phi_q, phi_k, v, log_decay]
    assert_tree_close(value_and_grads_of(halves, args, cot), value_and_grads_of(ref, args, cot), 1e-5, 1e-4)


@pytest.mark.slow
def test_linear_segment_ids():
    # Packed sequences (the state resets at each start, one start on the chunk boundary) with a per-step gate.
    phi_q, phi_k, v, key = linear_inputs(2, lq=150, lk=150)
    ids = jnp.asarray(np.stack([np.repeat([0, 1, 2], [40, 88, 22]), np.repeat([0, 1], [128, 22])]))
    gate = decay_of("step", key, 150)
    cot = jax.random.normal(jax.random.key(3), v.shape)
    kernel = lambda q, k, v, g: tpu_linear.chunked_linear_attention(q, k, v, decay=g, causal=True, segment_ids=ids)
    ref = lambda q, k, v, g: la.reference(q, k, v, decay=g, causal=True, segment_ids=ids)
    assert_tree_close(value_and_grads_of(kernel, [phi_q, phi_k, v, gate], cot),
                      value_and_grads_of(ref, [phi_q, phi_k, v, gate], cot), 1e-5, 1e-5)


@pytest.mark.slow
def test_linear_padded_keys_do_not_leak():
    phi_q, phi_k, v, _ = linear_inputs(1, lq=45, lk=45)
    mask = lengths_mask([33, 45], 45)
    fn = jax.jit(lambda *a: tpu_linear.chunked_linear_attention(*a, causal=True, mask=mask))
    noisy = jnp.where(mask[:, :, None, None], v, 1e3)
    np.testing.assert_array_equal(np.asarray(fn(phi_q, phi_k, v)), np.asarray(fn(phi_q, phi_k, noisy)))


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["step", "channel"])
def test_linear_per_shard_under_a_mesh_equals_the_unsharded_call(decay):
    # 8 emulated devices (2 x 2 x 2): batch over data x fsdp, heads over tensor, through sharding.per_shard.
    phi_q, phi_k, v, key = linear_inputs(3, b=4, lq=40, lk=40)
    gate = decay_of(decay, key, 40)
    gate = jnp.concatenate([gate, gate[::-1]])
    cot = jax.random.normal(jax.random.key(4), v.shape)
    fn = lambda q, k, v, g: tpu_linear.chunked_linear_attention(q, k, v, decay=g, causal=True)
    want = value_and_grads_of(fn, (phi_q, phi_k, v, gate), cot)
    the_mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("length", None))
    with jax.set_mesh(the_mesh), nn.logical_axis_rules(rules):
        assert "shard_map" in str(jax.make_jaxpr(fn)(phi_q, phi_k, v, gate))
        got = value_and_grads_of(fn, (phi_q, phi_k, v, gate), cot)
    assert_tree_close(got, want, 1e-6, 1e-6)


def flags(length, keep_lengths, reset_at):
    keep = jnp.asarray(np.arange(length)[None, :] < np.asarray(keep_lengths)[:, None])
    reset = np.zeros((2, length), bool)
    for row, cols in enumerate(reset_at):
        reset[row, cols] = True
    return keep, jnp.asarray(reset)


def check_scan(length, chunk, p=6, n=5, with_flags=True, dtype=jnp.float32, tol=(1e-5, 1e-4)):
    args = scan_inputs(0, length=length, p=p, n=n, dtype=dtype)
    opts = {}
    if with_flags:
        keep, reset = flags(length, [length - 8, length], [[5, length // 2], [min(128, length - 1)]])
        opts = dict(keep=keep, reset=reset)
    cot = jax.random.normal(jax.random.key(1), args[0].shape)
    out, grads = value_and_grads_of(lambda *a: tpu_scan.selective_scan(*a, chunk_size=chunk, **opts), args, cot)
    want, want_grads = value_and_grads_of(lambda *a: ss.reference(*a, **opts), args, cot)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert_tree_close(out, want, tol[0], tol[0])
    assert_tree_close(grads, want_grads, tol[1], tol[1])


@pytest.mark.slow
@pytest.mark.parametrize("length,chunk,p,n,with_flags", [
    # two chunks of 128 (state and adjoint cross a boundary, a reset on it in row 1), padded time, two channel
    # blocks (130 channels), d_state 5 padded to 8, keep and reset
    (150, 128, 130, 5, True),
])
def test_scan_equals_reference(length, chunk, p, n, with_flags):
    check_scan(length, chunk, p=p, n=n, with_flags=with_flags)


@pytest.mark.slow
def test_scan_bfloat16():
    check_scan(40, None, dtype=jnp.bfloat16, tol=(1e-2, 2e-2))


def test_backend_contract():
    # Each module is one op of dispatch's mosaic_tpu backend; supports gives a reason or None and never raises.
    f32 = jnp.float32
    feats = jax.ShapeDtypeStruct((2, 300, 4, 64), f32)
    for module, op in ((tpu_linear, "linear"), (tpu_scan, "scan")):
        assert module.NAME == "mosaic_tpu" and module.PLATFORMS == ("tpu",) and list(module.OPS) == [op]
        assert "op 'flash'" in module.supports("flash", {})
        assert module.supports(op, {"phi_q": object(), "b": object()}).startswith("unreadable call")
    assert tpu_linear.OPS["linear"] is tpu_linear.chunked_linear_attention
    assert tpu_scan.OPS["scan"] is tpu_scan.selective_scan
    linear = dict(phi_q=feats, phi_k=feats, v=feats, causal=True, mask=None, segment_ids=None)
    assert tpu_linear.supports("linear", linear) is None  # CPU: TPU interpret mode
    assert "interpret=True" in tpu_linear.supports("linear", {**linear, "interpret": False})
    half = jax.ShapeDtypeStruct(feats.shape, jnp.float16)
    assert "float16" in tpu_linear.supports("linear", dict(linear, phi_q=half, phi_k=half, v=half))
    wide = jax.ShapeDtypeStruct((2, 300, 4, 4096), f32)
    assert "feature dim" in tpu_linear.supports("linear", dict(linear, phi_q=wide, phi_k=wide))
    assert tpu_linear.supports("linear", dict(linear, return_state=True)) is None
    ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    assert "segment_ids need causal" in tpu_linear.supports("linear", dict(linear, causal=False, segment_ids=ids))
    state = jax.ShapeDtypeStruct((2, 300, 4, 16), f32)
    scan = dict(x=feats, delta=feats, a_log=jax.ShapeDtypeStruct((4, 64, 16), f32), b=state, c=state)
    assert tpu_scan.supports("scan", scan) is None
    assert "d_state" in tpu_scan.supports("scan", {**scan, "b": jax.ShapeDtypeStruct((2, 300, 4, 128), f32)})


def linear_grad_fn(causal, decay):
    fn = lambda q, k, v, g: tpu_linear.chunked_linear_attention(q, k, v, causal=causal, decay=g, interpret=False)
    return fn, jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3) if decay else (0, 1, 2))


def test_linear_lowers_for_tpu():
    # Lowering only: Pallas -> Mosaic for the forward and the three backward kernels, several chunks, bfloat16.
    shape = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 300, 2), jnp.float32)
    fn, grad = linear_grad_fn(True, True)
    assert tpu_calls(fn, shape, shape, shape, gate) == 1
    assert tpu_calls(grad, shape, shape, shape, gate) == 4
    short = jax.ShapeDtypeStruct((1, 37, 2, 8), jnp.float32)  # one chunk of 48 rows: blocks span the whole length
    assert tpu_calls(grad, short, short, short, jax.ShapeDtypeStruct((1, 37, 2), jnp.float32)) == 4
    wide = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)  # 128 values + the ones column: a 256-lane block
    assert tpu_calls(grad, wide, wide, wide, gate) == 4


def test_per_channel_linear_lowers_for_tpu():
    # The per-channel kernels: forward 1, gradient 4 (d phi_q and d phi_k with the decay on their own channels).
    shape = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
    fn, grad = linear_grad_fn(True, True)
    channels = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.float32)
    assert tpu_calls(fn, shape, shape, shape, channels) == 1
    assert tpu_calls(grad, shape, shape, shape, channels) == 4
    short = jax.ShapeDtypeStruct((1, 37, 2, 8), jnp.float32)  # one chunk of 48 rows
    assert tpu_calls(grad, short, short, short, short) == 4
    wide = jax.ShapeDtypeStruct((1, 300, 2, 520), jnp.float32)  # 640 feature lanes: five channel blocks
    assert tpu_calls(grad, wide, wide, jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.float32), wide) == 4


def test_bidirectional_linear_and_scan_lower_for_tpu():
    shape = jax.ShapeDtypeStruct((1, 300, 2, 72), jnp.float32)
    fn, grad = linear_grad_fn(False, False)
    assert tpu_calls(fn, shape, shape, shape, None) == 1
    assert tpu_calls(grad, shape, shape, shape, None) == 4
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((2, 300, 2, 64), f32)
    b = jax.ShapeDtypeStruct((2, 300, 2, 16), f32)
    a_log, d_skip = jax.ShapeDtypeStruct((2, 64, 16), f32), jax.ShapeDtypeStruct((2, 64), f32)
    scan = lambda *a: tpu_scan.selective_scan(*a, interpret=False)
    assert tpu_calls(scan, x, x, a_log, b, b, d_skip) == 1
    grad = jax.grad(lambda *a: jnp.sum(scan(*a)), argnums=tuple(range(6)))
    assert tpu_calls(grad, x, x, a_log, b, b, d_skip) == 2
