"""RAS (Liu et al. 2025): the per-patch metric against numpy, the starvation-scaled scores, static-size
active/cached sets in both selection directions, the cached-noise merge in a jitted toy sampler step, the
README's uniformity claim (and the literal code direction that contradicts it), and the Reducer's refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_method_checks import key, vit

from effjax.tokens import ras, spec


def test_patch_metric_is_the_channel_std_or_norm_averaged_over_each_patch():
    diff = jax.random.normal(key(0), (2, 6, 4, 5))
    d = np.asarray(diff, np.float64)
    for metric, per_pixel in (("std", d.std(-1, ddof=1)), ("l2norm", np.linalg.norm(d, axis=-1))):
        got = ras.patch_metric(diff, 2, metric)
        want = per_pixel.reshape(2, 3, 2, 2, 2).mean((2, 4)).reshape(2, 6)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    drop = jnp.arange(12.0).reshape(2, 6) - 30
    np.testing.assert_allclose(ras.ras_scores(diff, 2, drop, 0.1), ras.patch_metric(diff, 2) * np.exp(0.1 * drop),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="3x3 patches"):
        ras.patch_metric(diff, 3)


@pytest.mark.parametrize("cache", ["high", "low"])
def test_select_active_gives_static_disjoint_sorted_sets_caching_one_end(cache):
    scores = jax.random.uniform(key(1), (3, 20))
    active, cached = jax.jit(ras.select_active, static_argnums=1, static_argnames="cache")(scores, 0.7, cache=cache)
    assert active.shape == (3, 14) and cached.shape == (3, 6)  # int(0.3 * 20) = 6 cached
    s = np.asarray(scores)
    for b in range(3):
        assert sorted(active[b].tolist() + cached[b].tolist()) == list(range(20))
        assert np.all(np.diff(active[b]) > 0) and np.all(np.diff(cached[b]) > 0)
        if cache == "high":
            assert s[b, cached[b]].min() > s[b, active[b]].max()
        else:
            assert s[b, cached[b]].max() < s[b, active[b]].min()
    drop = ras.update_drop_count(ras.init_drop_count(3, 20, 31), cached)
    was_cached = np.stack([np.isin(np.arange(20), cached[b]) for b in range(3)])
    np.testing.assert_array_equal(np.asarray(drop), np.where(was_cached, -30.0, -31.0))


def test_a_jitted_ras_step_runs_the_model_on_active_tokens_only_and_reuses_cached_noise():
    def step(x, noise, drop):
        """One RAS step of a toy sampler: the 'DiT' doubles its input tokens."""
        scores = ras.ras_scores(noise.reshape(1, 4, 4, 3), 2, drop)  # 4 latent patches of 2 x 2 x 3 -> 4 tokens
        active, cached = ras.select_active(scores, 0.5)
        out = 2.0 * ras.take_tokens(x, active)
        full = ras.CachedTokens(jnp.ones_like(x)).merge(out, active)
        return full, active, cached, ras.update_drop_count(drop, cached)

    x = jax.random.normal(key(2), (1, 4, 12))
    noise = jax.random.normal(key(3), (1, 4, 12))
    full, active, cached, drop = jax.jit(step)(x, noise, ras.init_drop_count(1, 4, 30))
    assert active.shape == (1, 2) and cached.shape == (1, 2)
    np.testing.assert_array_equal(full[0, active[0]], 2 * x[0, active[0]])
    np.testing.assert_array_equal(full[0, cached[0]], np.ones((2, 12)))
    np.testing.assert_array_equal(drop[0, cached[0]], [-29, -29])
    assert ras.CachedTokens(full).update(x).noise is x


def active_spread(scale, cache, steps=26, n=64):
    """Std over tokens of how often each was active in ``steps`` RAS steps with a fixed per-token metric (the
    focus is continuous across steps): 0 is perfectly uniform sampling."""
    metric = jax.random.uniform(key(4), (1, n), minval=0.5, maxval=1.5)
    drop = ras.init_drop_count(1, n, steps + 5)
    counts = np.zeros(n)
    for _ in range(steps):
        active, cached = ras.select_active(metric * jnp.exp(scale * drop), 0.5, cache=cache)
        drop = ras.update_drop_count(drop, cached)
        counts[np.asarray(active[0])] += 1
    return counts.std()


def test_uniformity_grows_with_the_starvation_scale_only_when_starved_tokens_become_active():
    # The README: a larger scale makes sampling more uniform. True when the lowest scores are cached ...
    low = [active_spread(s, "low") for s in (0.0, 0.05, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in zip(low, low[1:], strict=False)) and low[-1] < 0.1 * low[0]
    # ... or when the code's 'cache the highest' meets a negative scale;
    high_negative = [active_spread(s, "high") for s in (0.0, -0.1, -1.0)]
    assert all(a > b for a, b in zip(high_negative, high_negative[1:], strict=False))
    # as the code is written (cache the highest, positive scale), cached tokens stay cached at any scale.
    assert active_spread(0.1, "high") == active_spread(1.0, "high") == low[0] == 13.0  # half always, half never


def test_the_reducer_refuses_the_block_loop():
    assert spec("ras").place == "block" and not spec("ras").learned
    model = vit(2, method="ras", keep=0.5, layers="1")
    with pytest.raises(NotImplementedError, match="diffusion sampler"):
        jax.eval_shape(model.init, key(0), jnp.zeros((1, 16, 16, 3)))
