"""Grouped / permuted softmax methods (sliced_group, subregion, attention_tile, flat_window) and histogram.

The allowed-pair masks of the references are written here with numpy from each paper's definition; the
FlatFormer order is checked on toy grids against orders derived by hand from the reference's sort key, and
Histoformer's core against a float64 numpy loop that sorts, bins and un-sorts by scatter.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention
from effjax.attention import block_local, permute, softmax
from effjax.attention.flat_window import flat_order
from effjax.attention.subregion import subregion_order

B, H, D, L = 2, 2, 8, 64
REAL = np.array([45, 64])
MASK = np.arange(L)[None, :] < REAL[:, None]
FAST = {"xla_backend_optimization_level": 0}
GROUPED = ["sliced_group", "subregion", "attention_tile", "flat_window"]


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def module(name):
    return importlib.import_module(f"effjax.attention.{name}")


def call(name, q, k, v, **params):
    """``attend`` of method ``name`` jitted (XLA backend optimisations off) with ``params`` closed over."""
    return jit(lambda q, k, v: module(name).attend(q, k, v, **params))(q, k, v)


def qkv(seed, length=L, lk=None, dtype=jnp.float32, heads=H, dim=D):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(B, length, heads, dim)] + [(B, lk or length, heads, dim)] * 2
    return [jax.random.normal(kk, s, dtype) for kk, s in zip(keys, shapes, strict=True)]


def naive(q, k, v, allowed, mask=None):
    """float64 masked softmax; ``allowed`` broadcastable to [B, H, Lq, Lk]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.broadcast_to(allowed, logits.shape).copy()
    if mask is not None:
        allowed &= np.asarray(mask)[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def same(ids):
    ids = np.asarray(ids)
    return ids[..., :, None] == ids[..., None, :]


def group_of_token(order, group_size):
    """Group id of each token when tokens are taken in ``order`` and cut into runs of group_size."""
    position = np.empty(len(order), int)
    position[np.asarray(order)] = np.arange(len(order))
    return position // group_size


def tile_mask(length, frame, a):
    f = np.arange(length) // frame
    return (f[:, None] == f[None, :]) | (f[None, :] < a) | (f[:, None] < a)


# name -> list of (params, reference allowed-pair mask [L, L]) at L = 64 (an 8 x 8 grid).
PERM = np.random.RandomState(0).permutation(L)
CASES = {
    "sliced_group": [(dict(groups=4), same(np.arange(L) // 16)),
                     (dict(groups=8, order=PERM), same(group_of_token(PERM, 8)))],
    "subregion": [(dict(ratio=s, chunk=n), same((np.arange(L) // n) % s)) for s, n in [(4, 1), (4, 4), (2, 8)]],
    "attention_tile": [(dict(frame_len=f, num_global_frames=a), tile_mask(L, f, a))
                       for f, a in [(8, 0), (8, 1), (8, 3), (16, 1)]],
    "flat_window": [(dict(window=(4, 4), group_size=16, axis=ax, shift=sh),
                     same(group_of_token(flat_order((8, 8), (4, 4), ax, sh), 16)))
                    for ax, sh in [("x", False), ("y", True)]]
                   + [(dict(window=(3, 3), group_size=12), same(group_of_token(flat_order((8, 8), (3, 3)), 12)))],
}
FLAT_CASES = [(name, i) for name, cases in CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize(("name", "case"), FLAT_CASES)
def test_matches_naive_mask_with_padding_and_segments(name, case):
    params, allowed = CASES[name][case]
    q, k, v = qkv(case)
    out = call(name, q, k, v, mask=MASK, **params)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[MASK], naive(q, k, v, allowed, MASK)[MASK], rtol=2e-5, atol=2e-5)
    seg = np.repeat(np.array([[1, 2], [3, 4]]), [24, L - 24], axis=1)
    out = call(name, q, k, v, mask=MASK, segment_ids=seg, **params)
    ref = naive(q, k, v, allowed & same(seg)[:, None], MASK)
    np.testing.assert_allclose(np.asarray(out)[MASK], ref[MASK], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", GROUPED)
def test_bfloat16_close_to_reference(name):
    params, allowed = CASES[name][0]
    q, k, v = qkv(20)
    out = call(name, *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask=MASK, **params)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[MASK], naive(q, k, v, allowed, MASK)[MASK],
                               atol=6e-2)


@pytest.mark.parametrize("name", GROUPED)
def test_all_padded_group_gives_finite_outputs_and_real_rows_ignore_padding(name):
    params, _ = CASES[name][0]
    q, k, v = qkv(21)
    mask = np.ones((B, L), bool)
    mask[0, 16:] = False  # whole groups / frames / subregion members padded
    mask[1, ::2] = False
    out = call(name, q, k, v, mask=mask, **params)
    assert np.all(np.isfinite(out))
    pad = ~mask[:, :, None, None]
    out2 = call(name, q, k + 5.0 * pad, v - 4.0 * pad, mask=mask, **params)
    np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", GROUPED)
def test_module_matches_attend_and_applies_dropout(name):
    params, _ = CASES[name][0]
    params = {key: val for key, val in params.items() if key != "order"}
    q, k, v = qkv(22)
    mod = attention.make(name, dropout_rate=0.5, **params)
    variables = jit(lambda q, k, v: mod.init(jax.random.key(0), q, k, v, mask=MASK))(q, k, v)
    assert not jax.tree.leaves(variables)
    eval_out = jit(lambda q, k, v: mod.apply({}, q, k, v, mask=MASK))(q, k, v)
    np.testing.assert_allclose(eval_out, call(name, q, k, v, mask=MASK, **params), rtol=1e-6, atol=1e-6)
    train = jit(lambda key: mod.apply({}, q, k, v, mask=MASK, deterministic=False, rngs={"dropout": key}))
    a = train(jax.random.key(1))
    np.testing.assert_array_equal(a, train(jax.random.key(1)))
    assert not np.allclose(a, eval_out)


def test_special_cases_reduce_to_softmax_and_block_local():
    q, k, v = qkv(23)
    full = softmax.attend(q, k, v, mask=MASK)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(call("sliced_group", q, k, v, mask=MASK, groups=1), full, **tol)
    np.testing.assert_allclose(call("subregion", q, k, v, mask=MASK, ratio=1), full, **tol)
    np.testing.assert_allclose(call("attention_tile", q, k, v, mask=MASK, num_global_frames=8), full, **tol)
    # Real rows only: a padded query in an all-padded group averages its group, block_local's all keys.
    local = np.asarray(block_local.attend(q, k, v, mask=MASK, block_size=16))[MASK]
    real = lambda x: np.asarray(x)[MASK]  # noqa: E731
    np.testing.assert_allclose(real(call("sliced_group", q, k, v, mask=MASK, groups=4)), local, **tol)
    np.testing.assert_allclose(real(call("attention_tile", q, k, v, mask=MASK, num_frames=4,
                                                                    num_global_frames=0)), local, **tol)
    # FlatFormer on a 1-row grid with one window along it: the sort is the identity, so it is block-local.
    np.testing.assert_array_equal(flat_order((1, L), (1, L)), np.arange(L))
    flat = call("flat_window", q, k, v, mask=MASK, grid_hw=(1, L), window=(1, L), group_size=16)
    np.testing.assert_allclose(real(flat), local, **tol)
    # frame_len wins over num_frames.
    np.testing.assert_array_equal(call("attention_tile", q, k, v, num_frames=2, frame_len=16,
                                                                  num_global_frames=0),
                                  call("attention_tile", q, k, v, num_frames=4, num_global_frames=0))


def test_flat_order_snakes_on_a_toy_grid():
    # Derived by hand from the reference key on a 4 x 4 grid with 2 x 2 windows (token = row * 4 + col):
    # x order: window rows top to bottom, the second one right to left with each window's order reversed;
    # inside a window, down the first column and up the second.
    np.testing.assert_array_equal(flat_order((4, 4), (2, 2), "x"),
                                  [0, 4, 5, 1, 2, 6, 7, 3, 11, 15, 14, 10, 9, 13, 12, 8])
    np.testing.assert_array_equal(flat_order((4, 4), (2, 2), "y"),
                                  [0, 1, 5, 4, 8, 9, 13, 12, 14, 15, 11, 10, 6, 7, 3, 2])
    # One window covering a 3 x 3 grid: a plain column snake.
    np.testing.assert_array_equal(flat_order((3, 3), (3, 3), "x"), [0, 3, 6, 7, 4, 1, 2, 5, 8])
    # Shifted windows on a 6 x 5 grid: each (shifted) window's tokens are contiguous in the order, windows are
    # visited in the snake over window rows, and the order is a permutation.
    order = flat_order((6, 5), (3, 2), "x", shift=True)
    np.testing.assert_array_equal(np.sort(order), np.arange(30))
    row, col = np.divmod(order, 5)
    win_row, win_col = (row + 1) // 3, (col + 1) // 2
    snake_rank = win_row * 10 + np.where(win_row % 2, -win_col, win_col)
    assert np.all(np.diff(snake_rank) >= 0)
    assert not np.array_equal(order, flat_order((6, 5), (3, 2), "x"))


def test_subregion_order_deals_chunks_round_robin():
    np.testing.assert_array_equal(subregion_order(8, 2, 1), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(subregion_order(16, 2, 4), [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


def test_sliced_group_shuffle_uses_random_stream_and_a_fixed_eval_permutation():
    q, k, v = qkv(24)
    mod = attention.make("sliced_group", groups=2, shuffle=True, eval_seed=3)
    fixed = jax.random.permutation(jax.random.key(3), L)
    evaluated = jit(lambda q, k, v: mod.apply({}, q, k, v, mask=MASK))(q, k, v)
    np.testing.assert_allclose(evaluated, call("sliced_group", q, k, v, mask=MASK, groups=2, order=fixed),
                               rtol=1e-6, atol=1e-6)
    train = jit(lambda key: mod.apply({}, q, k, v, mask=MASK, deterministic=False, rngs={"random": key}))
    outs = [train(jax.random.key(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2]) and not np.allclose(outs[0], evaluated)
    # Per-row permutations ([batch, length]) are accepted as well.
    rows = np.stack([np.random.RandomState(s).permutation(L) for s in (1, 2)])
    out = call("sliced_group", q, k, v, groups=4, order=rows)
    for b in range(B):
        ref = naive(q[b:b + 1], k[b:b + 1], v[b:b + 1], same(group_of_token(rows[b], 16)))
        np.testing.assert_allclose(out[b:b + 1], ref, rtol=2e-5, atol=2e-5)


def test_permutation_round_trip_is_the_identity():
    x = jax.random.normal(jax.random.key(25), (B, L, H, D))
    for order in (PERM, np.stack([PERM, PERM[::-1]]), jnp.argsort(x, axis=1)):
        np.testing.assert_array_equal(permute.gather(permute.gather(x, order), permute.inverse(order)), x)


# ---------------------------------------------------------------- histogram


def histogram_reference(q, k, v, mask, num_bins, temperature, branches=("bin", "frequency")):
    """float64 loop: per (batch, head) sort each channel by v (padding last), zero padding, pad to a multiple
    of num_bins, attend over (channel, bin) tokens with cosine * temperature and softmax_1 over the tokens
    holding a real pixel, then scatter back to the original positions; branch outputs multiply."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, length, h_, d_ = q.shape
    padded = -(-length // num_bins) * num_bins
    n = padded // num_bins
    out = np.ones_like(q)
    for b in range(b_):
        for h in range(h_):
            qs, ks, vs, real = (np.zeros((d_, padded)) for _ in range(4))
            idx = np.zeros((d_, length), int)
            for c in range(d_):
                key = np.where(mask[b], v[b, :, h, c], np.inf)
                idx[c] = np.argsort(key, kind="stable")
                real[c, :length] = mask[b][idx[c]]
                qs[c, :length], ks[c, :length], vs[c, :length] = (x[b, idx[c], h, c] for x in (q, k, v))
            qs, ks, vs = qs * real, ks * real, vs * real
            for branch in branches:
                if branch == "bin":  # token (c, f) holds sorted positions f*n .. f*n + n - 1
                    pos = np.arange(num_bins)[:, None] * n + np.arange(n)[None, :]
                else:  # token (c, f) holds sorted positions f, f + num_bins, ...
                    pos = np.arange(n)[None, :] * num_bins + np.arange(num_bins)[:, None]
                tok = lambda a, pos=pos: a[:, pos].reshape(d_ * num_bins, n)  # noqa: E731
                tq, tk, tv, treal = tok(qs), tok(ks), tok(vs), tok(real)
                tq = tq / np.maximum(np.linalg.norm(tq, axis=1, keepdims=True), 1e-12)
                tk = tk / np.maximum(np.linalg.norm(tk, axis=1, keepdims=True), 1e-12)
                e = np.exp(tq @ tk.T * temperature[h]) * treal.any(1)[None, :]
                res = (e / (e.sum(1, keepdims=True) + 1.0)) @ tv
                sorted_out = np.zeros((d_, padded))
                sorted_out[:, pos.reshape(-1)] = res.reshape(d_, num_bins * n)
                unsorted = np.zeros((d_, length))
                for c in range(d_):
                    unsorted[c, idx[c]] = sorted_out[c, :length]
                out[b, :, h, :] *= unsorted.T
    return out


@pytest.mark.parametrize(("length", "num_bins", "branches"),
                         [(30, 4, "both"), (32, 4, "bin"), (32, 3, "frequency"), (24, 2, "both")])
def test_histogram_matches_materialized_reference(length, num_bins, branches):
    q, k, v = qkv(30, length, dim=4)
    mask = np.arange(length)[None, :] < np.array([[length - 11], [length]])
    temperature = np.array([0.7, 1.6])
    out = call("histogram", q, k, v, mask=mask, num_bins=num_bins, temperature=temperature, branches=branches)
    chosen = {"both": ("bin", "frequency"), "bin": ("bin",), "frequency": ("frequency",)}[branches]
    ref = histogram_reference(q, k, v, mask, num_bins, temperature, chosen)
    np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_histogram_sort_and_unsort_round_trip():
    q, k, v = qkv(31, 32)
    mask = np.arange(32)[None, :] < np.array([[20], [32]])
    order = module("histogram").value_order(v + 9.0 * ~mask[:, :, None, None], mask)
    sorted_v = np.asarray(permute.gather(v, order))
    assert np.all(np.diff(sorted_v[0, :20], axis=0) >= 0) and np.all(np.diff(sorted_v[1], axis=0) >= 0)
    np.testing.assert_array_equal(np.asarray(order)[0, 20:], np.broadcast_to(np.arange(20, 32)[:, None, None],
                                                                             (12, H, D)))
    np.testing.assert_array_equal(permute.gather(permute.gather(v, order), permute.inverse(order)), v)


def test_histogram_padding_including_empty_bins_is_ignored_and_finite():
    q, k, v = qkv(32, 32)
    mask = np.arange(32)[None, :] < np.array([[10], [32]])  # row 0: bins 2 and 3 (of 8 pixels) fully padded
    fn = jit(lambda q, k, v: module("histogram").attend(q, k, v, mask=mask, num_bins=4))
    out = fn(q, k, v)
    assert np.all(np.isfinite(out))
    pad = ~mask[:, :, None, None]
    out2 = fn(q - 2.0 * pad, k + 3.0 * pad, v + 30.0 * pad)
    np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask], rtol=1e-6, atol=1e-6)


def test_histogram_gradients_match_finite_differences():
    q, k, v = qkv(33, 16, dim=4)
    mask = np.arange(16)[None, :] < np.array([[12], [16]])
    temp = jnp.array([0.8, 1.2])

    def loss(q, k, t):
        out = module("histogram").attend(q, k, v, mask=mask, num_bins=2, temperature=t)
        return jnp.sum(jnp.sin(3.0 * out))

    grads = jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, temp)
    loss = jit(loss)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    rng = np.random.RandomState(0)
    for arg in range(3):
        args = [q, k, temp]
        direction = rng.normal(size=args[arg].shape).astype(np.float32)
        eps = 1e-2
        plus, minus = list(args), list(args)
        plus[arg], minus[arg] = args[arg] + eps * direction, args[arg] - eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        analytic = float(jnp.sum(grads[arg] * direction))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)


def test_histogram_module_has_per_head_temperature_and_default_bins_equal_heads():
    q, k, v = qkv(34, 32)
    mod = attention.make("histogram")
    variables = jit(lambda q, k, v: mod.init(jax.random.key(0), q, k, v))(q, k, v)
    np.testing.assert_array_equal(variables["params"]["temperature"], np.ones(H))
    apply = jit(lambda vs: mod.apply(vs, q, k, v))
    np.testing.assert_allclose(apply(variables), call("histogram", q, k, v, num_bins=H), rtol=1e-6, atol=1e-6)
    hot = {"params": {"temperature": jnp.array([3.0, 0.5])}}
    np.testing.assert_allclose(apply(hot), call("histogram", q, k, v, num_bins=H, temperature=np.array([3.0, 0.5])),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(apply(hot), apply(variables))


# ---------------------------------------------------------------- refusals and bad sizes


@pytest.mark.parametrize("name", GROUPED + ["histogram"])
def test_refuses_causal_and_cross_attention_naming_the_method(name):
    q, k, v = qkv(40)
    qc, kc, vc = qkv(40, 32, lk=64)
    with pytest.raises(NotImplementedError, match=f"{name}: causal"):
        call(name, q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match=f"{name}: causal"):
        attention.make(name).init(jax.random.key(0), q, k, v, causal=True)
    with pytest.raises(NotImplementedError, match=f"{name}: cross attention"):
        call(name, qc, kc, vc)


def test_bad_sizes_and_arguments_raise_naming_the_method():
    q, k, v = qkv(41, 60)
    cases = [
        ("sliced_group", dict(groups=8), "sliced_group: sequence length 60 is not divisible by groups 8"),
        ("sliced_group", dict(groups=0), "sliced_group: groups must be"),
        ("sliced_group", dict(groups=4, order=np.zeros(60, int)), "sliced_group: order is not a permutation"),
        ("sliced_group", dict(groups=4, order=np.arange(8)), "sliced_group: order must have shape"),
        ("subregion", dict(ratio=4, chunk=4), "subregion: sequence length 60 is not divisible by ratio \\* chunk"),
        ("subregion", dict(ratio=0), "subregion: ratio must be a positive int"),
        ("attention_tile", dict(num_frames=8), "attention_tile: sequence length 60 is not divisible by num_frames"),
        ("attention_tile", dict(frame_len=8), "attention_tile: sequence length 60 is not a multiple of frame_len"),
        ("attention_tile", dict(frame_len=6, num_global_frames=-1), "attention_tile: num_global_frames must be"),
        ("flat_window", {}, "flat_window: sequence length 60 is not a perfect square"),
        ("flat_window", dict(grid_hw=(6, 10), axis="z"), "flat_window: axis must be 'x' or 'y'"),
        ("flat_window", dict(grid_hw=(6, 10), group_size=0), "flat_window: group size must be a positive int"),
        ("histogram", dict(branches="both-ish"), "histogram: branches must be one of"),
        ("histogram", dict(num_bins=61), "histogram: num_bins must be an int"),
    ]
    for name, params, message in cases:
        with pytest.raises(ValueError, match=message):
            call(name, q, k, v, **params)
    with pytest.raises(NotImplementedError, match="histogram: segment_ids are not supported"):
        call("histogram", q, k, v, segment_ids=np.ones((B, 60), np.int32))
