"""ToMe (Bolya et al. 2023): bipartite soft matching against a loop-by-loop reading of the paper's algorithm,
size-weighted merging, prefix tokens, recovery, and ToMe inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effjax.models as models
from effjax.tokens import TokenState, recover, tome
from effjax.tokens import state as state_lib


def naive_tome(x, sizes, metric, r, prefix):
    """One example, float64 loops: the groups [output slot -> original positions] and merged x and sizes."""
    n = len(x)
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
    r = min(r, (n - prefix) // 2)
    best = {}
    for a in set_a:
        if prefix >= 1 and a == 0:
            continue  # CLS is never a source
        candidates = [b for b in set_b if not (prefix >= 2 and b == 1)]  # nothing merges into the distill token
        scores = [float(m[a] @ m[b]) for b in candidates]
        best[a] = (max(scores), candidates[int(np.argmax(scores))])
    ranked = sorted(best, key=lambda a: -best[a][0])  # stable: ties keep index order
    sources = ranked[:r]
    unmerged = [a for a in set_a if a not in sources]
    if prefix == 0:
        unmerged = ranked[r:]
    groups = [[a] for a in unmerged] + [[b] + [a for a in sources if best[a][1] == b] for b in set_b]
    if prefix >= 2:  # [unm_0, dst_0, unm_1:, dst_1:]
        k = len(unmerged)
        groups = [groups[0], groups[k]] + groups[1:k] + groups[k + 1:]
    merged = np.stack([sum(sizes[i] * x[i] for i in g) / sum(sizes[i] for i in g) for g in groups])
    return groups, merged, np.array([sum(sizes[i] for i in g) for g in groups])


def random_case(seed, batch=3, n=17, d=8, c=5):
    kx, km, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, n, d))
    metric = jax.random.normal(km, (batch, n, c))
    sizes = jax.random.randint(ks, (batch, n), 1, 4).astype(jnp.float32)
    source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    return x, metric, TokenState(sizes, source)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("n,r", [(17, 5), (16, 7), (17, 100), (9, 1)])
def test_matching_equals_the_papers_algorithm_run_as_loops(prefix, n, r):
    x, metric, tokens = random_case(n * 10 + r + prefix, n=n)
    out, new = jax.jit(tome.merge, static_argnums=(3, 4))(x, tokens, metric, r, prefix)
    for b in range(x.shape[0]):
        groups, merged, sizes = naive_tome(np.asarray(x[b], np.float64), np.asarray(tokens.sizes[b], np.float64),
                                           np.asarray(metric[b], np.float64), r, prefix)
        assert out.shape[1] == len(groups) == n - min(r, (n - prefix) // 2)
        got = [sorted(np.flatnonzero(np.asarray(new.source[b]) == slot).tolist()) for slot in range(len(groups))]
        assert got == [sorted(g) for g in groups]  # the same tokens in the same output slots, exactly
        np.testing.assert_allclose(out[b], merged, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new.sizes[b], sizes)


def test_prefix_tokens_stay_first_unmerged_and_sizes_sum_to_the_original_count():
    x, metric, tokens = random_case(1, n=33)
    x2, tokens2 = x, tokens
    merge = jax.jit(tome.merge, static_argnums=(3, 4))
    for _ in range(3):
        x2, tokens2 = merge(x2, tokens2, metric[:, :x2.shape[1]], 6, 2)
    assert x2.shape[1] == 33 - 18
    np.testing.assert_allclose(x2[:, :2], x[:, :2], rtol=1e-6, atol=1e-6)  # (s x) / s, so up to an ulp
    np.testing.assert_array_equal(tokens2.source[:, :2], np.broadcast_to([0, 1], (3, 2)))
    np.testing.assert_allclose(tokens2.sizes.sum(1), tokens.sizes.sum(1))


def test_r_zero_is_the_identity_and_identical_tokens_merge_to_themselves():
    x, metric, tokens = random_case(2)
    same, kept = tome.merge(x, tokens, metric, 0, 1)
    assert same is x and kept is tokens
    flat = jnp.broadcast_to(x[:, :1], x.shape)  # every token equal
    out, new = tome.merge(flat, tokens, metric, 6, 1)
    np.testing.assert_allclose(out, flat[:, :out.shape[1]], rtol=1e-6, atol=1e-6)


def test_recover_maps_every_original_position_to_the_token_that_absorbed_it():
    x, metric, tokens = random_case(3, n=21)
    merge = jax.jit(tome.merge, static_argnums=(3, 4))
    out, new = merge(x, tokens, metric, 8, 1)
    out2, new2 = merge(out, new, metric[:, :out.shape[1]], 4, 1)
    full = np.asarray(recover(out2, new2.source))
    assert full.shape == x.shape
    source, out2_np = np.asarray(new2.source), np.asarray(out2)
    for b in range(3):
        for i in range(21):
            np.testing.assert_array_equal(full[b, i], out2_np[b, source[b, i]])
    # The size of each output token is the number of originals mapped to it, weighted by their start sizes.
    counted = state_lib.scatter_sum(tokens.sizes, new2.source, out2.shape[1])
    np.testing.assert_allclose(counted, new2.sizes)


def vit(**kw):
    return models.build("vit_classifier", vocab_size=1, num_classes=10, num_layers=3, embed_dim=32, num_heads=4,
                        mlp_dim=64, pooling="cls", image_size=(16, 16), channels=3, patch_size=4, **kw)


@pytest.mark.slow  # the default tier's twin: tests/test_tokens_conformance.py's ToMe-in-a-ViT check
def test_tome_inside_a_vit_follows_the_schedule_with_r_zero_unchanged():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    base = vit()
    variables = base.init(jax.random.key(1), images)
    logits = base.apply(variables, images)
    np.testing.assert_array_equal(vit(tokens=dict(method="tome", r=0)).apply(variables, images), logits)
    reduced = vit(tokens=dict(method="tome", r="(4,-1)"))
    out, inter = jax.jit(lambda v, x: reduced.apply(v, x, mutable=["intermediates"]))(variables, images)
    assert np.all(np.isfinite(out)) and not np.allclose(out, logits)
    assert reduced.token_plan(17, 1).counts == (9, 5, None)  # removals 8, 4, 0 from 16 patches + CLS
    sizes = inter["intermediates"]["token_sizes"][0]
    assert sizes.shape == (2, 5)
    np.testing.assert_array_equal(sizes.sum(1), [17, 17])
