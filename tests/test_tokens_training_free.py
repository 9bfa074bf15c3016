"""Properties every training-free token-reduction method shares (random pruning, Top-K, ATS, Zero-TPrune, Token
Transforming, DiffRate, MCTF): keep == n is the identity, exactly ``keep`` tokens under jit, prefix tokens first
and untouched, sizes, identical tokens, the source map and ``recover``, padding. Each method's own selection rule,
its gradients and its place in a ViT are checked in its own file (tests/test_tokens_<method>.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from token_cases import jit_run, random_case, run

from effjax.tokens import recover
from effjax.tokens import state as state_lib

METHODS = ["random_prune", "topk", "ats", "zero_tprune", "token_transforming", "diffrate", "mctf"]
PRUNING = {"random_prune", "topk", "ats", "zero_tprune"}  # each kept token is one original, the rest dropped
SUMMING = {"token_transforming", "mctf"}  # every original's size ends up in some output (DiffRate: x similarity)
HARD = PRUNING | {"diffrate", "mctf"}  # each original goes to one output or none
N, KEEP = 16, 9  # 7 removed: within the half MCTF may merge with one or two prefix tokens


@pytest.mark.parametrize("method", METHODS)
def test_reduction_properties(method):
    x, qkv, tokens = random_case(1)
    same, kept = run(method, x, qkv, tokens, N, 1)  # keep == n: the identity
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(kept.sizes, tokens.sizes)
    np.testing.assert_array_equal(kept.source, tokens.source)

    reduce = lambda x: jit_run(method, x, qkv, tokens, KEEP, 1)
    out, new = reduce(x)
    assert out.shape == (2, KEEP, N) and new.sizes.shape == (2, KEEP) and new.source.shape == (2, N)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6, atol=1e-6)  # CLS first and untouched
    np.testing.assert_array_equal(new.source[:, 0], 0)
    np.testing.assert_array_equal(new.sizes[:, 0], tokens.sizes[:, 0])

    source, sizes = np.asarray(new.source), np.asarray(new.sizes)
    assert source.min() >= -1 and source.max() < KEEP
    absorbed = np.asarray(state_lib.scatter_sum(tokens.sizes, new.source, KEEP))  # start sizes sent to a slot
    if method in PRUNING:  # a kept token keeps its size; pruned ones count nowhere
        np.testing.assert_array_equal(sizes, absorbed)
        for row in source:
            assert np.bincount(row[row >= 0], minlength=KEEP).max() <= 1
    if method in SUMMING:
        np.testing.assert_allclose(sizes.sum(1), tokens.sizes.sum(1), rtol=1e-5)
    if method == "mctf":
        np.testing.assert_array_equal(sizes, absorbed)
    full, out_np = np.asarray(recover(out, new.source)), np.asarray(out)  # the absorbing token, pruned ones 0
    for b in range(2):
        for i in range(N):
            want = out_np[b, source[b, i]] if source[b, i] >= 0 else np.zeros(N)
            np.testing.assert_array_equal(full[b, i], want)

    if method in HARD:  # one-hot features: an output's support is exactly the originals the source map sends it
        eye = jnp.broadcast_to(jnp.eye(N), (2, N, N)) + 0.0
        out_eye, new_eye = reduce(eye)
        support, eye_source = np.abs(np.asarray(out_eye)) > 1e-7, np.asarray(new_eye.source)
        for b in range(2):
            for slot in range(KEEP):
                np.testing.assert_array_equal(support[b, slot], eye_source[b] == slot)

    identical = jnp.broadcast_to(x[:, 3:4], x.shape)  # identical tokens merge (or prune) to themselves
    out_same, new_same = reduce(identical)
    real = np.ones((2, KEEP), bool) if new_same.mask is None else np.asarray(new_same.mask)
    want = np.broadcast_to(np.asarray(x[:, 3:4]), out_same.shape)
    np.testing.assert_allclose(np.asarray(out_same)[real], want[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_distillation_token_stays_second_and_padding_goes_first(method):
    x, qkv, tokens = random_case(2, padded=4)
    tokens = tokens.replace(sizes=tokens.sizes.at[:, :2].set(1.0))
    out, new = jit_run(method, x, qkv, tokens, KEEP, 2)
    assert out.shape == (2, KEEP, N) and np.all(np.isfinite(out)) and np.all(np.isfinite(new.sizes))
    np.testing.assert_allclose(out[:, :2], x[:, :2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new.sizes[:, :2], 1.0)
    np.testing.assert_array_equal(new.source[:, :2], np.broadcast_to([0, 1], (2, 2)))
    assert new.mask is not None and new.mask.shape == (2, KEEP)
    np.testing.assert_array_equal(np.asarray(new.sizes)[~np.asarray(new.mask)], 0.0)
    if method in PRUNING:
        assert np.all(np.asarray(new.source)[:, N - 4:] == -1)  # the 4 padded tokens are pruned before real ones
    if method in SUMMING:
        np.testing.assert_allclose(new.sizes.sum(1), tokens.sizes.sum(1), rtol=1e-5)
