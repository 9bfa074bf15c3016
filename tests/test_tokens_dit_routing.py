"""Dynamic token routing, simplified (after Ma et al. 2023): the gate's top-keep tokens continue in order, the
training path's straight-through gates and sown budget loss, and gradients in a ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from token_method_checks import assert_kept, assert_model, key, start

from effjax.tokens import dit_routing


def run(x, tokens, keep, prefix, deterministic=True):
    reducer = dit_routing.Reducer()
    kw = dict(keep=keep, prefix=prefix)
    variables = jax.jit(lambda k: reducer.init(k, x, tokens, None, **kw))(key(1))
    fn = jax.jit(lambda v, x, t: reducer.apply(v, x, t, None, **kw, deterministic=deterministic,
                                               mutable=["losses"]))
    return variables, fn(variables, x, tokens)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_the_most_open_gates_continue_in_order_with_prefix_first(prefix):
    x, tokens = start(3, 21, seed=prefix)
    variables, ((out, new), sown) = run(x, tokens, 12, prefix)
    assert not sown
    assert_kept(x, tokens, out, new, 12, prefix)
    gates = dit_routing.Gate().apply({"params": variables["params"]["gate"]}, x[:, prefix:])
    assert np.all((gates > 0) & (gates < 1))
    for b in range(3):
        top = np.sort(np.argsort(-np.asarray(gates[b]), kind="stable")[:12 - prefix]) + prefix
        np.testing.assert_array_equal(out[b, prefix:], x[b, top])


def test_keep_n_is_the_identity_and_training_matches_inference_forward_with_a_budget_loss():
    x, tokens = start(2, 17)
    _, ((same, kept), _) = run(x, tokens, 17, 1)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(kept.source, tokens.source)
    variables, ((out, new), sown) = run(x, tokens, 9, 1, deterministic=False)
    _, ((ref, ref_state), _) = run(x, tokens, 9, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-6)  # straight-through: the forward pass is the hard routing
    np.testing.assert_array_equal(new.source, ref_state.source)
    gates = dit_routing.Gate().apply({"params": variables["params"]["gate"]}, x[:, 1:])
    (budget,) = sown["losses"]["dit_routing_budget"]
    np.testing.assert_allclose(budget, jnp.mean((gates.sum(1) / 16 - 8 / 16) ** 2), rtol=1e-5)


@pytest.mark.slow  # three compiles of a 4-layer ViT (init, training gradient, inference)
def test_a_vit_with_routing_trains_its_gates_and_runs_jitted():
    tokens = dict(method="dit_routing", keep=0.7, layers="1,2")
    grads, losses, sizes = assert_model(**tokens)
    assert any(p.startswith("tokens_2/gate/hidden") for p in grads)
    assert len(jax.tree_util.tree_leaves(losses)) == 2
    assert sizes.shape == (2, 8)
