"""Token Transforming (Zeng et al. 2025): the many-to-many matrix T, the transformed tokens and sizes against a
naive float64 construction of the rule in the module docstring, the hard-merge limit of a small temperature,
gradients, and Token Transforming inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_cases import check_in_vit, jit_run, probabilities, random_case

from effjax.tokens import token_transforming


def naive_transform(x, sizes, cls, keys, keep, prefix, temperature):
    """One example in float64: (x', s', T, anchors)."""
    n = len(x)
    best = np.argsort(-cls[prefix:], kind="stable")[:keep - prefix] + prefix
    anchors = list(range(prefix)) + sorted(int(i) for i in best)
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    t = np.zeros((keep, n))
    for j in range(n):
        if j in anchors:
            t[anchors.index(j), j] = 1.0
            continue
        logits = np.array([unit[j] @ unit[a] / temperature for a in anchors[prefix:]])
        e = np.exp(logits - logits.max())
        t[prefix:, j] = e / e.sum()
    new_sizes = t @ sizes
    return (t * sizes) @ x / new_sizes[:, None], new_sizes, t, anchors


def test_transform_equals_the_naive_construction():
    x, qkv, tokens = random_case(0, n=14)
    q, k, _ = qkv
    cls = probabilities(q, k)[:, :, 0].mean(1)
    keys = np.asarray(k, np.float64).mean(2)
    for prefix, keep, temperature in ((1, 8, 0.1), (2, 5, 0.5)):
        out, new = jit_run("token_transforming", x, qkv, tokens, keep, prefix, temperature=temperature)
        for b in range(2):
            want_x, want_sizes, t, anchors = naive_transform(np.asarray(x[b], np.float64),
                                                             np.asarray(tokens.sizes[b], np.float64), cls[b],
                                                             keys[b], keep, prefix, temperature)
            np.testing.assert_allclose(t.sum(0), 1.0)  # each original token is spread over the anchors
            np.testing.assert_allclose(out[b], want_x, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(new.sizes[b], want_sizes, rtol=1e-5)
            np.testing.assert_array_equal(new.source[b], t.argmax(0))  # each original's largest T entry
            np.testing.assert_array_equal(np.asarray(new.source[b])[anchors], np.arange(keep))


def test_a_small_temperature_is_a_hard_merge_into_the_most_similar_anchor():
    x, qkv, tokens = random_case(1, n=14)
    importance = jnp.asarray(probabilities(qkv[0], qkv[1])[:, :, 0].mean(1), jnp.float32)
    metric = jnp.mean(qkv[1], axis=2)
    t, anchors = token_transforming.transform_matrix(importance, metric, 6, 1, temperature=1e-4)
    t = np.asarray(t)
    np.testing.assert_allclose(t.max(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-5)
    assert np.all(t[:, 0, 1:] == 0)  # nothing spreads into CLS


def test_gradients_are_finite():
    x, qkv, tokens = random_case(2)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    loss = lambda x: jnp.sum(jit_run("token_transforming", x, qkv, tokens, 9, 1)[0] * direction)
    grad = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_token_transforming_inside_a_vit():
    *_, inter = check_in_vit("token_transforming", needs_probabilities=True)
    np.testing.assert_allclose(np.asarray(inter["token_sizes"][0]).sum(1), 17.0, rtol=1e-5)
