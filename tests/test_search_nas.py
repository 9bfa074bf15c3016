"""Pareto ranking, model costs and the mixed-attention NAS space (``effjax.search.{pareto,costs,nas_space}``)."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import attention as attention_lib
from effjax import models
from effjax.models import layer_attention
from effjax.search import costs, nas_space, pareto

# ---------------------------------------------------------------------------------------------- pareto


def brute_dominates(a, b):
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def test_dominates():
    assert pareto.dominates([1, 2], [1, 3])
    assert not pareto.dominates([1, 3], [1, 2])
    assert not pareto.dominates([1, 2], [1, 2])  # equal points do not dominate each other
    assert not pareto.dominates([1, 3], [2, 1])


@pytest.mark.parametrize("seed", range(6))
def test_non_dominated_sort_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 40), rng.integers(1, 4)
    points = rng.integers(0, 4, size=(n, m)).astype(float)  # few values: ties and duplicates
    points = np.concatenate([points, points[: n // 3]])  # exact duplicates too
    fronts = pareto.non_dominated_sort(points)
    assert sorted(itertools.chain(*fronts)) == list(range(len(points)))
    rank = {i: r for r, front in enumerate(fronts) for i in front}
    for i, p in enumerate(points):
        dominators = [j for j, q in enumerate(points) if brute_dominates(q, p)]
        if rank[i] == 0:
            assert not dominators
        else:  # dominated by a point of the front just before, and by none of its own front or later
            assert any(rank[j] == rank[i] - 1 for j in dominators)
        assert all(rank[j] < rank[i] for j in dominators)
    assert pareto.pareto_front(points) == [i for i, p in enumerate(points)
                                           if not any(brute_dominates(q, p) for q in points)]
    order = pareto.nsga2_order(points)
    assert sorted(order) == list(range(len(points)))
    assert [rank[i] for i in order] == sorted(rank[i] for i in order)


def test_crowding_distance_by_hand():
    # One front. Objective 0 sorted 1, 2, 4, 6 (span 5); objective 1 sorted 1, 2, 3, 5 (span 4).
    points = [[1, 5], [2, 3], [4, 2], [6, 1]]
    expected = [np.inf, (4 - 1) / 5 + (5 - 2) / 4, (6 - 2) / 5 + (3 - 1) / 4, np.inf]
    np.testing.assert_allclose(pareto.crowding_distance(points), expected)
    np.testing.assert_array_equal(pareto.crowding_distance([[1, 2], [2, 1]]), [np.inf, np.inf])
    assert pareto.crowding_distance(np.zeros((0, 2))).shape == (0,)
    # A constant objective adds nothing to inner points.
    np.testing.assert_allclose(pareto.crowding_distance([[0, 1], [1, 1], [3, 1]]), [np.inf, 1.0, np.inf])


def test_nsga2_order_by_rank_then_crowding():
    points = [[1, 5], [2, 3], [4, 2], [6, 1], [2.5, 3.5], [7, 7]]
    # Front 0: 0..3 (boundaries 0 and 3 first, then 1 (1.35) before 2 (1.3)); front 1: 4; front 2: 5.
    assert pareto.non_dominated_sort(points) == [[0, 1, 2, 3], [4], [5]]
    assert pareto.nsga2_order(points) == [0, 3, 1, 2, 4, 5]
    assert pareto.pareto_front(points) == [0, 1, 2, 3]
    assert pareto.non_dominated_sort(np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match="NaN"):
        pareto.non_dominated_sort([[np.nan, 1.0]])


# ----------------------------------------------------------------------------------------------- costs


def test_param_count_and_flops_of_a_matmul():
    assert costs.param_count({"a": jnp.ones((3, 4)), "b": [jnp.ones(5)]}) == 17
    assert costs.param_count(jax.eval_shape(lambda: {"w": jnp.ones((2, 8))})) == 16
    m, k, n = 8, 16, 4
    flops = costs.flops_per_step(jnp.matmul, jnp.ones((m, k)), jnp.ones((k, n)))
    assert flops == 2 * m * k * n  # what XLA reports on CPU for a dot: a multiply and an add per term


def test_step_latency_is_a_positive_median():
    fn = jax.jit(lambda x: x * 2)
    seconds = costs.step_latency(fn, jnp.ones(4), repeats=3)
    assert 0 < seconds < 1
    with pytest.raises(ValueError, match="repeats"):
        costs.step_latency(fn, jnp.ones(4), repeats=0)


def test_decode_state_by_hand():
    # embed 32 over 4 heads: head_dim 8. Context 64, float32.
    tiny = dict(embed_dim=32, num_heads=4, num_layers=2)
    kv = 2 * 4 * 8 * 4  # k and v of every head, per token, per layer
    assert costs.decode_state_bytes_per_token({**tiny, "attention": "softmax"}, 64) == 2 * kv
    linear = 4 * (8 * 8 + 8) * 4  # per head sum phi(k) v^T [8, 8] and sum phi(k) [8], bytes, fixed
    assert costs.decode_state_bytes_per_token({**tiny, "attention": "linear_elu"}, 64) == 2 * linear / 64
    # Mixed, with MASFormer's full layer 1 and a window of 8 (keys [i - 8, i]: 9 tokens of the 64).
    fields = {**tiny, "attention": ("linear_elu", "linear_elu"), "full_attention_layers": (1,)}
    assert costs.decode_state_bytes_per_token(fields, 64) == linear / 64 + kv
    window = {**tiny, "attention": "sliding_window", "attention_params": {"sliding_window": {"window": 8}}}
    assert costs.decode_state_bytes_per_token(window, 64) == 2 * 9 * kv / 64
    assert costs.decode_state_bytes_per_token(window, 4) == 2 * kv  # a window past the context is full KV
    assert costs.decode_state_bytes_per_token({**tiny, "attention": "softmax"}, 64, dtype_bytes=2) == kv


def test_decode_state_table_covers_causal_methods_and_falls_back(monkeypatch):
    causal = nas_space.causal_methods()
    assert set(costs.DECODE_STATE) <= set(causal)  # no stale rows
    fields = dict(embed_dim=32, num_heads=4, num_layers=len(causal), attention=tuple(causal))
    rows = costs.decode_state_layers(fields, 128)
    assert [row["method"] for row in rows] == causal
    assert all(row["bytes_per_token"] > 0 for row in rows)
    by_method = {row["method"]: row["bytes_per_token"] for row in rows}
    assert by_method["linear_elu"] < by_method["softmax"] and by_method["mamba"] < by_method["softmax"]
    monkeypatch.delitem(costs.DECODE_STATE, "softmax")
    (row,) = costs.decode_state_layers(dict(embed_dim=32, num_heads=4, num_layers=1), 16)
    assert row["note"] == costs.UNCLASSIFIED and row["bytes_per_token"] == 2 * 4 * 8 * 4


# ------------------------------------------------------------------------------------------- nas_space


def abstract_init(fields):
    """Param shapes of a decoder LM with ``fields`` (jax.eval_shape: traced, never run)."""
    model = models.build("decoder_lm", vocab_size=17, num_classes=None, max_length=16, dropout_rate=0.0, **fields)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16), jnp.int32))


def test_methods_are_the_causal_registry_methods():
    space = nas_space.NasSpace()
    assert list(space.methods) == [n for n in attention_lib.names() if attention_lib.capabilities(n).causal]
    assert "softmax" in space.methods and "bigbird" not in space.methods
    assert nas_space.NasSpace(methods=["softmax", "performer"]).methods == ("softmax", "performer")
    with pytest.raises(ValueError, match="known: .*softmax"):
        nas_space.NasSpace(methods=["bigbird"])
    with pytest.raises(ValueError, match="divide"):
        nas_space.NasSpace(embed_dims=(64, 36), head_counts=(8,))


def test_seed_is_all_softmax_and_builds():
    space = nas_space.NasSpace()
    (seed,) = space.seeds()
    fields = space.model_fields(seed)
    assert fields == {"embed_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256,
                      "attention": ("softmax", "softmax"), "full_attention_layers": (), "full_attention": "softmax"}
    assert costs.param_count(abstract_init(fields)) > 0
    # Without softmax among the genes, the MASFormer flags give the same computation (and key).
    flagged = nas_space.NasSpace(methods=["performer", "linear_elu"])
    assert flagged.key(flagged.seeds()[0]) == space.key(seed)
    assert flagged.layer_methods(flagged.seeds()[0]) == ("softmax", "softmax")


def hand_genome():
    return nas_space.Genome(embed_dim=96, num_layers=3, num_heads=8, mlp_ratio=2,
                            attention=("performer", "softmax", "mamba", "cosformer"),
                            full_attention=(False, False, True, True))


def test_model_fields_of_a_hand_genome():
    space = nas_space.NasSpace(fixed_fields={"max_length": 16})
    genome = hand_genome()
    assert space.model_fields(genome) == {
        "max_length": 16, "embed_dim": 96, "num_layers": 3, "num_heads": 8, "mlp_dim": 192,
        "attention": ("performer", "softmax", "mamba"), "full_attention_layers": (2,), "full_attention": "softmax"}
    assert space.layer_methods(genome) == ("performer", "softmax", "softmax")
    assert [m for m, _ in layer_attention.resolve(space.model_fields(genome))] == ["performer", "softmax", "softmax"]
    table = space.describe(genome)
    assert "3 layers" in table and "(inert)" in table and "mamba" in table and space.key(genome) in table


def test_inert_genes_do_not_change_the_key():
    space = nas_space.NasSpace()
    genome = hand_genome()
    key = space.key(genome)
    past_the_end = nas_space.Genome(**{**genome.__dict__, "attention": ("performer", "softmax", "mamba", "hyena"),
                                       "full_attention": (False, False, True, False)})
    flagged_gene = nas_space.Genome(**{**genome.__dict__, "attention": ("performer", "softmax", "linear_elu",
                                                                        "cosformer")})
    spelled_out = nas_space.Genome(**{**genome.__dict__, "attention": ("performer", "softmax", "softmax",
                                                                       "cosformer"),
                                      "full_attention": (False, True, False, True)})
    assert space.key(past_the_end) == space.key(flagged_gene) == space.key(spelled_out) == key
    assert space.key(nas_space.Genome(**{**genome.__dict__, "num_layers": 4})) != key
    assert space.key(nas_space.Genome(**{**genome.__dict__, "full_attention": (True, False, True, True)})) != key


def test_json_round_trip_and_errors():
    space = nas_space.NasSpace()
    genome = hand_genome()
    data = space.to_json(genome)
    assert space.from_json(data) == genome
    assert space.key(space.from_json(data)) == space.key(genome)
    assert space.from_json(json.loads(json.dumps(data))) == genome

    def broken(**changes):
        return {**data, **changes}

    with pytest.raises(ValueError, match="unknown method.*'nope'.*known: .*softmax"):
        space.from_json(broken(attention=["nope", "softmax", "mamba", "cosformer"]))
    with pytest.raises(ValueError, match="missing \\['num_heads'\\]"):
        space.from_json({k: v for k, v in data.items() if k != "num_heads"})
    with pytest.raises(ValueError, match="embed_dim='96' is not one of"):
        space.from_json(broken(embed_dim="96"))
    with pytest.raises(ValueError, match="embed_dim=96.0 is not one of"):
        space.from_json(broken(embed_dim=96.0))
    with pytest.raises(ValueError, match="list of 4 entries"):
        space.from_json(broken(attention=["softmax"]))
    with pytest.raises(ValueError, match="booleans"):
        space.from_json(broken(full_attention=[0, 0, 1, 1]))
    with pytest.raises(ValueError, match="checksum"):
        space.from_json(broken(num_layers=4))
    with pytest.raises(ValueError, match="JSON object"):
        space.from_json([1])
    restricted = nas_space.NasSpace(methods=["softmax", "performer"])
    with pytest.raises(ValueError, match="'mamba'.*known: softmax, performer"):
        restricted.from_json(data)


def test_mutations_and_crossovers_stay_valid():
    space = nas_space.NasSpace()
    rng = np.random.default_rng(0)
    population = space.seeds()
    seen = set()
    for step in range(400):
        parent = population[rng.integers(len(population))]
        if step % 4 == 3:
            child = space.crossover(parent, population[rng.integers(len(population))], rng)
        else:
            child, description = space.mutate(parent, rng)
            assert child != parent and description
        assert space.from_json(space.to_json(child)) == child  # validates every gene
        fields = space.model_fields(child)
        assert fields["embed_dim"] % fields["num_heads"] == 0
        assert len(layer_attention.resolve(fields)) == child.num_layers
        population.append(child)
        seen.add(space.key(child))
    assert len(seen) > 100
    used = {m for genome in population for m in space.layer_methods(genome)}
    assert len(used) > len(space.methods) // 2
    for genome in population[-3:]:  # build a handful only
        assert costs.param_count(abstract_init(space.model_fields(genome))) > 0


def test_mutation_changes_a_gene_even_at_rate_zero():
    space = nas_space.NasSpace(mutation_rate=0.0)
    rng = np.random.default_rng(1)
    seed = space.seeds()[0]
    keys = set()
    for _ in range(50):
        child, description = space.mutate(seed, rng)
        assert child != seed and ";" not in description  # exactly one gene
        keys.add(space.key(child))
    assert space.key(seed) not in keys  # the forced gene is an active one
    with pytest.raises(ValueError, match="single candidate"):
        nas_space.NasSpace(embed_dims=(32,), layer_counts=(1,), head_counts=(4,), mlp_ratios=(2,),
                           methods=["softmax"], full_attention_genes=False).mutate(seed, rng)


def test_crossover_is_uniform():
    space = nas_space.NasSpace()
    a = space.seeds()[0]
    b = hand_genome()
    rng = np.random.default_rng(2)
    children = [space.crossover(a, b, rng) for _ in range(200)]
    for gene in ("embed_dim", "num_layers", "num_heads", "mlp_ratio"):
        values = [getattr(c, gene) for c in children]
        assert set(values) == {getattr(a, gene), getattr(b, gene)}
        assert 60 < sum(v == getattr(a, gene) for v in values) < 140
    for i in range(space.max_layers):
        assert {c.attention[i] for c in children} == {a.attention[i], b.attention[i]}


def test_every_causal_method_builds_in_one_mixed_model():
    methods = nas_space.causal_methods()
    space = nas_space.NasSpace(embed_dims=(32,), layer_counts=(len(methods),), head_counts=(4,), mlp_ratios=(2,),
                               full_attention_genes=False)
    genome = nas_space.Genome(embed_dim=32, num_layers=len(methods), num_heads=4, mlp_ratio=2,
                              attention=tuple(methods), full_attention=(False,) * len(methods))
    shapes = abstract_init(space.model_fields(genome))
    assert sorted(shapes["params"]["trunk"]) == sorted(
        ["token_embed", "pos_embed", "ln_final", *(f"block_{i}" for i in range(len(methods)))])


@pytest.mark.slow
def test_a_mixed_candidate_trains_a_step_and_costs_add_up():
    """Slow twin of the builds above: runs a mixed candidate's forward and backward, and costs it."""
    space = nas_space.NasSpace(embed_dims=(32,), layer_counts=(3,), head_counts=(4,), mlp_ratios=(2,),
                               fixed_fields={"max_length": 32, "dropout_rate": 0.0})
    genome = nas_space.Genome(embed_dim=32, num_layers=3, num_heads=4, mlp_ratio=2,
                              attention=("performer", "mamba", "sliding_window"), full_attention=(False, True, False))
    model = models.build("decoder_lm", vocab_size=17, num_classes=None, **space.model_fields(genome))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 17, (2, 32)), jnp.int32)
    # Random params of the init's shapes: compiling the init itself takes longer than the step here.
    draw = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.1 * draw.standard_normal(leaf.shape), leaf.dtype),
                          jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad = jax.jit(jax.grad(loss))
    grads = grad(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert costs.flops_per_step(grad, params) > 0
    assert costs.param_count(params) == costs.param_count(grads)
    assert costs.decode_state_bytes_per_token(space.model_fields(genome), 32) > 0
