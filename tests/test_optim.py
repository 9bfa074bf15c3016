"""The optimizer from the config: ``config.trainable`` trains the matching params only (no update, no weight
decay, no optimizer state for the rest) and refuses a pattern that matches nothing or does not compile."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effjax.train import optim


def config(**overrides):
    c = ml_collections.ConfigDict(dict(learning_rate=0.1, schedule="constant", warmup_steps=0, total_steps=10,
                                       adam_b1=0.9, adam_b2=0.98, weight_decay=0.5, grad_clip_norm=1.0,
                                       trainable=""))
    c.update(overrides)
    return c


PARAMS = {"block_0": {"tokens": {"prune_logits": jnp.ones(3)}, "mlp": {"kernel": jnp.ones((2, 2))}},
          "head": {"kernel": jnp.ones((2, 4))}}


def one_step(c):
    tx, _ = optim.make_optimizer(c)
    grads = {"block_0": {"tokens": {"prune_logits": jnp.full(3, 0.5)}, "mlp": {"kernel": jnp.full((2, 2), 0.5)}},
             "head": {"kernel": jnp.full((2, 4), 0.5)}}
    state = tx.init(PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    return optax.apply_updates(PARAMS, updates), state


def test_trainable_updates_only_the_matching_params():
    new, state = one_step(config(trainable="tokens/.*_logits"))
    assert np.all(np.asarray(new["block_0"]["tokens"]["prune_logits"]) < 1.0)
    np.testing.assert_array_equal(new["block_0"]["mlp"]["kernel"], PARAMS["block_0"]["mlp"]["kernel"])
    np.testing.assert_array_equal(new["head"]["kernel"], PARAMS["head"]["kernel"])
    everything, _ = one_step(config())
    assert np.all(np.asarray(everything["head"]["kernel"]) < 1.0)
    paths = [optim.param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(PARAMS)[0]]
    assert paths == ["block_0/mlp/kernel", "block_0/tokens/prune_logits", "head/kernel"]


@pytest.mark.parametrize("pattern,message", [("attention", "matches no parameter; paths look like"),
                                             ("(", "is not a regular expression")])
def test_a_bad_trainable_pattern_is_refused_in_one_line(pattern, message):
    with pytest.raises(ValueError, match=message) as err:
        one_step(config(trainable=pattern))
    assert "\n" not in str(err.value) and "config.trainable" in str(err.value)


def test_keep_frozen_resets_only_frozen_params():
    from effjax.train import steps

    old = {"attention": {"frozen_projection": jnp.zeros(2), "query": jnp.zeros(2)}}
    new = {"attention": {"frozen_projection": jnp.ones(2), "query": jnp.ones(2)}}
    kept = steps.keep_frozen(new, old)
    np.testing.assert_array_equal(kept["attention"]["frozen_projection"], 0.0)
    np.testing.assert_array_equal(kept["attention"]["query"], 1.0)
