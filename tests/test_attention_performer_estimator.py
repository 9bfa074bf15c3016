"""performer equals the exact FAVOR+ estimator (float64, no stabiliser) for the same projection.

The stabilised units (features scaled by the largest key) make denominators of 1e-3 to 1e-5; a flat
``den + 1e-6`` moved outputs by up to 1.6e-2 bidirectionally and by about 0.11 at the first causal position,
where the answer is v_0 exactly. These tests fail at that bias, for the XLA path and the Pallas kernel alike.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention import performer

HEAD_DIM, NUM_FEATURES = 64, 256  # the paper's defaults


def favor_estimate(q, k, v, projection, causal):
    """sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), phi(x) = m^-1/2 exp(w.x~ - |x~|^2/2), in float64."""
    q, k, v, w = (np.asarray(t, np.float64) for t in (q, k, v, projection))

    def phi(x):
        x = x * x.shape[-1] ** -0.25
        return np.exp(np.einsum("blhd,md->blhm", x, w) - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(len(w))

    scores = np.einsum("bqhm,bkhm->bhqk", phi(q), phi(k))
    if causal:
        scores = np.tril(scores)
    return np.einsum("bhqk,bkhd->bqhd", scores, v) / np.moveaxis(scores.sum(-1), 1, 2)[..., None]


def inputs(seed, length=48):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (2, length, 2, HEAD_DIM)) for kk in keys[:3])
    projection = performer.random_projection(keys[3], NUM_FEATURES, HEAD_DIM)
    return q, k, v, projection


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
@pytest.mark.parametrize("causal", [False, True])
def test_output_equals_the_unstabilised_estimator(causal, impl, monkeypatch):
    # The reference's 1e-6 added to the query features (kept by default) shifts outputs by up to 5e-4 here;
    # without it the only difference left is the denominator guard and float32 rounding.
    monkeypatch.setattr(performer, "FEATURE_EPS", 0.0)
    q, k, v, projection = inputs(0)
    out = performer.attend(q, k, v, projection, causal=causal, impl=impl)
    want = favor_estimate(q, k, v, projection, causal)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_first_causal_position_returns_its_own_value(impl):
    q, k, v, projection = inputs(1, length=16)
    out = performer.attend(q, k, v, projection, causal=True, impl=impl)
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(v[:, 0]), rtol=0, atol=1e-5)


def test_a_row_without_keys_gives_zero_not_nan():
    q, k, v, projection = inputs(2, length=8)
    mask = jnp.zeros((2, 8), bool).at[1].set(True)
    out = performer.attend(q, k, v, projection, mask=mask)
    assert np.all(np.asarray(out[0]) == 0.0) and np.all(np.isfinite(np.asarray(out)))
