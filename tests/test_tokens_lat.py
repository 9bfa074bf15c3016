"""LAT (Kachuee & Sharifkhani 2022): ACC as column sums of the attention probabilities, elimination of the
lowest-ACC tokens with [CLS] kept and padding first, the geometric schedule, and an encoder with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_method_checks import assert_kept, key, start

import effjax.models as models
from effjax.tokens import TokenState, lat, schedule
from effjax.tokens.stats import AttentionStats


def stats_for(batch, n, seed=0, mask=None, method="softmax"):
    q, k, v = (jax.random.normal(key(seed + i), (batch, n, 2, 4)) for i in range(3))
    return AttentionStats(q, k, v, mask=mask, method=method)


def test_acc_is_the_column_sum_over_real_queries_averaged_over_heads():
    probabilities = jax.nn.softmax(jax.random.normal(key(0), (2, 3, 7, 7)), axis=-1)
    mask = jnp.array([[True] * 7, [True] * 5 + [False] * 2])
    acc = lat.attention_context_contribution(probabilities, mask)
    p = np.asarray(probabilities)
    np.testing.assert_allclose(acc[0], p[0].sum(1).mean(0), rtol=1e-6)
    np.testing.assert_allclose(acc[1], p[1, :, :5].sum(1).mean(0), rtol=1e-6)
    np.testing.assert_allclose(lat.attention_context_contribution(probabilities).sum(1), [7, 7], rtol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_reducer_keeps_the_highest_acc_tokens_in_order_with_prefix_first(prefix):
    x, tokens = start(2, 15, seed=prefix)
    stats = stats_for(2, 15, seed=prefix)
    out, new = jax.jit(lambda x, t: lat.Reducer().apply({}, x, t, stats, keep=9, prefix=prefix))(x, tokens)
    assert_kept(x, tokens, out, new, 9, prefix)
    acc = np.asarray(lat.attention_context_contribution(stats.probabilities()))
    for b in range(2):
        top = np.sort(np.argsort(-acc[b, prefix:], kind="stable")[:9 - prefix]) + prefix
        np.testing.assert_array_equal(out[b, prefix:], x[b, top])
    same, kept = lat.Reducer().apply({}, x, tokens, stats, keep=15, prefix=prefix)
    assert same is x and kept is tokens


def test_padding_is_eliminated_first_and_the_schedule_is_geometric():
    mask = jnp.array([[True] * 12, [True] * 8 + [False] * 4])
    x, _ = start(2, 12)
    tokens = TokenState.start(2, 12, mask)
    out, new = lat.eliminate(x, tokens, stats_for(2, 12, mask=mask).probabilities(), 8, 1)
    assert np.all(new.mask) and np.all(np.asarray(new.source[1, 8:]) == -1)
    np.testing.assert_array_equal(out[1], x[1, :8])
    counts = schedule.counts(129, 1, 6, keep=0.9)
    assert counts == tuple(1 + int(128 * 0.9 ** k) for k in range(1, 7))  # 115, 103, 93, 83, 75, 68 + CLS


@pytest.mark.slow  # two compiles of a 3-layer encoder
def test_an_encoder_with_lat_and_padding_runs_jitted_and_keep_one_is_the_unreduced_model():
    def build(**tokens):
        return models.build("encoder_classifier", vocab_size=20, num_classes=3, num_layers=3, embed_dim=16,
                            num_heads=2, mlp_dim=32, max_length=16, pooling="mean", tokens=tokens or None)

    ids = jax.random.randint(key(0), (2, 16), 1, 20).at[1, 10:].set(0)
    base = build()
    variables = jax.jit(base.init)(key(1), ids)
    reduced = build(method="lat", keep=0.8)
    assert reduced.token_plan(16, 0).counts == (12, 10, 8)
    logits = jax.jit(reduced.apply)(variables, ids)
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
    np.testing.assert_array_equal(build(method="lat", keep=1.0).apply(variables, ids), base.apply(variables, ids))
    with pytest.raises(ValueError, match="probabilities"):
        models.build("encoder_classifier", vocab_size=20, num_classes=3, num_layers=3, embed_dim=16, num_heads=2,
                     mlp_dim=32, max_length=16, attention="performer",
                     tokens=dict(method="lat", keep=0.8)).init(key(1), ids)
