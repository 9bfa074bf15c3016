"""DiffRate (Chen et al. 2023): prune-then-merge against a loop-by-loop reading of the released algorithm, the
catalog's FLOP check on the published schedules (DeiT-S 2.905 G, DeiT-B 11.517 G), the schedule as model.tokens,
the learned-rate proxies (straight-through mask and counts), gradients, and DiffRate inside a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from token_cases import check_in_vit, jit_run, probabilities, random_case, random_variables, vit

from effjax.tokens import diffrate
from effjax.tokens import plan as plan_lib
from effjax.train.optim import param_path


def naive_diffrate(x, sizes, cls, keep, pruned, prefix):
    """One example in float64: groups per output slot (destination first), merged x and sizes."""
    n = len(x)
    order = list(range(prefix)) + [int(i) + prefix for i in np.argsort(-cls[prefix:], kind="stable")]
    kept = n - pruned
    dests, sources = order[:keep], order[keep:kept]
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    groups = {d: [d] for d in dests}
    weight = {d: 1.0 for d in dests}
    for s in sources:
        sims = [float(unit[s] @ unit[d]) if d not in range(prefix) else -np.inf for d in dests]
        best = dests[int(np.argmax(sims))]
        groups[best].append(s)
        weight[s] = max(sims)
    merged = np.stack([np.mean([x[i] for i in groups[d]], axis=0) for d in dests])  # unweighted mean
    new_sizes = np.array([sum(sizes[i] * weight[i] for i in groups[d]) for d in dests])  # size x similarity
    return [groups[d] for d in dests], merged, new_sizes


@pytest.mark.parametrize("prefix,keep,pruned", slow_after([(1, 9, 4), (2, 8, 0), (1, 7, 13)]))
def test_prune_merge_equals_the_released_algorithm_run_as_loops(prefix, keep, pruned):
    x, qkv, tokens = random_case(keep + pruned, n=20)
    cls = probabilities(qkv[0], qkv[1])[:, :, 0].mean(1)
    importance = jnp.asarray(cls, jnp.float32)
    out, new = jax.jit(diffrate.prune_merge, static_argnums=(4, 5, 6))(x, tokens, importance, x, keep, pruned,
                                                                        prefix)
    for b in range(2):
        groups, merged, sizes = naive_diffrate(np.asarray(x[b], np.float64), np.asarray(tokens.sizes[b], np.float64),
                                               cls[b], keep, pruned, prefix)
        got = [sorted(np.flatnonzero(np.asarray(new.source[b]) == slot).tolist()) for slot in range(keep)]
        assert got == [sorted(g) for g in groups]
        assert sum(len(g) for g in groups) == 20 - pruned
        np.testing.assert_allclose(out[b], merged, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.sizes[b], sizes, rtol=1e-5, atol=1e-6)


def test_flops_of_the_published_schedules_match_the_readme():
    deit_s = float(diffrate.flops(*diffrate.PUBLISHED["deit_s_2.9"], embed_dim=384)) / 1e9
    deit_b = float(diffrate.flops(*diffrate.PUBLISHED["deit_b_11.5"], embed_dim=768)) / 1e9
    assert round(deit_s, 3) == 2.905 and round(deit_b, 3) == 11.517
    full = [197] * 12
    assert round(float(diffrate.flops(full, full, embed_dim=384)) / 1e9, 2) == 4.60  # DeiT-S unreduced
    assert round(float(diffrate.flops(full, full, embed_dim=768)) / 1e9, 2) == 17.56  # DeiT-B unreduced


def test_a_published_schedule_becomes_model_tokens_and_each_layer_finds_its_prune_count():
    prune, merge = diffrate.PUBLISHED["deit_s_2.9"]
    tokens = diffrate.schedule(prune, merge)
    found = plan_lib.plan(tokens, num_layers=12, num_tokens=197, prefix=1)
    assert found.counts == (None, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)
    entering = 197
    for layer, keep in enumerate(found.counts):
        if keep is None:
            continue
        pruned = diffrate.pruned_count(entering, keep, 197, prune, merge)
        assert pruned == entering - min(prune[layer], entering)
        entering = keep
    with pytest.raises(ValueError, match="no layer of the schedule"):
        diffrate.pruned_count(190, 150, 197, prune, merge)


def test_learned_rates_mask_a_fixed_capacity_with_a_straight_through_gradient():
    x, qkv, tokens = random_case(3, n=20)
    importance = jnp.asarray(probabilities(qkv[0], qkv[1])[:, :, 0].mean(1), jnp.float32)
    size = len(diffrate.candidates(12, 1, 2))
    assert list(diffrate.candidates(12, 1, 2)) == [12, 10, 8, 6, 4, 2]

    def run(logits):
        return diffrate.learned_prune_merge(x, tokens, importance, x, 12, logits[0], logits[1], 1, 2)

    logits = jnp.zeros((2, size))
    out, new, (kept, keep_m) = jax.jit(run)(logits)
    assert out.shape == (2, 12, 16) and float(kept) == 7.0 and float(keep_m) == 7.0  # ceil(mean 7) = 7
    np.testing.assert_array_equal(new.mask, np.broadcast_to(np.arange(12) < 7, (2, 12)))
    np.testing.assert_array_equal(np.asarray(out)[:, 7:], 0.0)
    # Favouring the full capacity for pruning and 8 for merging: 12 kept, 4 of them merged into the first 8.
    favour = jnp.stack([jnp.zeros(size).at[0].set(50.0), jnp.zeros(size).at[2].set(50.0)])
    out, new, (kept, keep_m) = jax.jit(run)(favour)
    assert float(kept) == 12.0 and float(keep_m) == 8.0
    fixed, fixed_new = diffrate.prune_merge(x, tokens, importance, x, 8, 8, 1)
    np.testing.assert_allclose(out[:, :8], fixed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.sizes[:, :8], fixed_new.sizes, rtol=1e-6)
    np.testing.assert_array_equal(new.source, fixed_new.source)

    def loss(logits):
        out, _, (kept, keep_m) = run(logits)
        flops = diffrate.flops([kept], [keep_m], embed_dim=16, num_tokens=20, patch_size=1, channels=1)
        return jnp.sum(out ** 2) + 1e-6 * flops

    grad = jax.jit(jax.grad(loss))(logits)
    assert np.all(np.isfinite(grad)) and np.all(np.any(grad != 0, axis=1))  # both proxies learn


def test_gradients_are_finite():
    x, qkv, tokens = random_case(4)
    direction = jax.random.normal(jax.random.key(9), (2, 9, 16))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jit_run("diffrate", x, qkv, tokens, 9, 1)[0] * direction)))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # a ViT compile; the default tier runs a model with tome and dynamicvit
def test_diffrate_inside_a_vit_with_a_schedule_and_learned():
    tokens = diffrate.schedule((17, 12), (15, 9), num_tokens=17)  # prune 0 + merge 2, then prune 3 + merge 3
    *_, inter = check_in_vit("diffrate", needs_probabilities=True, r=tokens["r"], params=tokens["params"])
    assert inter["token_sizes"][0].shape == (2, 9)
    model = vit(tokens=dict(method="diffrate", r=4, params=dict(learned=True)))
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = random_variables(model, images)
    logits = variables["params"]["block_0"]["tokens"]["prune_logits"]
    assert logits.shape == (3,)  # the candidates 13, 9, 5 of 17 - 4 kept tokens
    logits, inter = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
    assert np.all(np.isfinite(logits))
    kept = inter["intermediates"]["block_0"]["tokens"]["diffrate_kept"][0]
    assert kept.shape == (2,) and 1 < float(kept[1]) <= float(kept[0]) <= 13


def test_flops_target_needs_learned_rates_which_get_diffrates_layout_without_a_schedule():
    learned = dict(method="diffrate", params=dict(learned=True), flops_target="2.9")
    found = plan_lib.plan(learned, num_layers=4, num_tokens=17, prefix=1)
    assert found.counts == (None, 17, 17, 17) and found.flops_target == 2.9 and found.flops_weight == 5.0
    assert found.flops_loss(3.1) == pytest.approx(5.0 * 0.2 ** 2)
    assert plan_lib.plan({**learned, "layers": "2"}, num_layers=4, num_tokens=17, prefix=1).counts == (
        None, None, 17, None)
    with_schedule = plan_lib.plan({**learned, "r": 4}, num_layers=3, num_tokens=17, prefix=1)
    assert with_schedule.counts == (13, 9, 5)  # a fixed schedule sets the capacities instead
    for tokens in (dict(method="diffrate", r=2, flops_target=2.9), dict(method="tome", r=2, flops_target=2.9)):
        with pytest.raises(ValueError, match="flops_target pulls learned token rates") as err:
            plan_lib.plan(tokens, num_layers=4, num_tokens=17, prefix=1)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="params.diffrate.learned=True"):
        plan_lib.plan(dict(method="diffrate", r=2, flops_target=2.9), num_layers=4, num_tokens=17, prefix=1)


def normalised_step_on_the_logits(path, param, grad):
    if not param_path(path).endswith("_logits"):
        return param
    return param - grad / jnp.maximum(jnp.max(jnp.abs(grad)), 1e-30)


def test_the_models_flops_loss_is_diffrates_count_and_descending_it_lowers_the_kept_counts():
    """The ViT sows DiffRate's analytic GMACs of the straight-through counts (mlp_dim = 4 embed, as the paper
    counts) and the loss flops_weight (G - target)^2; steps down its gradient on the rate logits alone lower
    every learned count until the model is under the target or at the fewest candidates."""
    target = 1.0e-4
    tokens = dict(method="diffrate", params=dict(learned=True, granularity=2), flops_target=target, flops_weight=1e6)
    model = vit(tokens=tokens, embed_dim=16, num_heads=2, mlp_dim=64, num_layers=3, dropout_rate=0.0)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    params = random_variables(model, images)["params"]

    def loss(params):
        _, state = model.apply({"params": params}, images, deterministic=False, mutable=["intermediates", "losses"],
                                   rngs={"dropout": jax.random.key(0)})
        return state["losses"]["tokens_flops"][0], state["intermediates"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    history = []
    for _ in range(4):
        (value, inter), grads = step(params)
        kept = [np.asarray(inter[f"block_{b}"]["tokens"]["diffrate_kept"][0]) for b in (1, 2)]
        prune, merge = [17] + [float(k[0]) for k in kept], [17] + [float(k[1]) for k in kept]
        gmacs = diffrate.flops(prune, merge, embed_dim=16, num_tokens=17, patch_size=4, channels=3,
                               num_classes=10) / 1e9
        np.testing.assert_allclose(inter["token_gmacs"][0], gmacs, rtol=1e-6)
        np.testing.assert_allclose(value, 1e6 * (gmacs - target) ** 2, rtol=1e-5)
        history.append((gmacs, min(merge)))
        params = jax.tree_util.tree_map_with_path(normalised_step_on_the_logits, params, grads)
    gmacs = [g for g, _ in history]
    assert all(later < earlier for earlier, later in zip(gmacs, gmacs[1:], strict=False)), history
