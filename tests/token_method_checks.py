"""Shared checks of the token-reduction method tests: a tiny ViT with a method on, the gradients its Reducers'
params get from a classification loss, and the invariants every Reducer output must satisfy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import effjax.models as models
from effjax.tokens import TokenState, spec


def vit(num_layers=4, **tokens):
    return models.build("vit_classifier", vocab_size=1, num_classes=10, num_layers=num_layers, embed_dim=32,
                        num_heads=4, mlp_dim=64, pooling="cls", image_size=(16, 16), channels=3, patch_size=4,
                        tokens=tokens or None)


def reducer_params(params):
    """The Reducers' params of a ViT's params: ``{path: array}`` under 'tokens_*' or 'block_*/tokens'."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, leaf in flat:
        keys = [str(getattr(p, "key", p)) for p in path]
        if any(k.startswith("tokens") for k in keys):
            out["/".join(keys)] = leaf
    return out


def key(seed):
    """A PRNG key of the 'rbg' kind: XLA compiles its RngBitGenerator far faster than threefry on CPU (a tiny
    ViT's init compiles in a third of the time), and the tests only need some random values."""
    return jax.random.key(seed, impl="rbg")


def random_params(model, images, seed=0):
    """Params of ``model`` in the shapes its init gives (traced only, nothing compiled): LayerNorm scales 1,
    everything else N(0, 0.05^2) from numpy. Compiling a ViT's init costs more than its gradient on CPU."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, key(1), images)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if str(getattr(path[-1], "key", "")) == "scale":
            return jnp.ones(shape.shape, shape.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def model_run(**tokens):
    """One compile of the 4-layer ViT with ``tokens`` on: ``(params, grads, sown losses, logits, token sizes)``
    - the gradient of a cross-entropy loss in training mode (the method's sown 'losses' returned, not added)
    and the inference forward with its final token sizes."""
    model = vit(**tokens)
    images = jax.random.uniform(key(0), (2, 16, 16, 3))
    labels = jnp.array([1, 7])
    params = random_params(model, images)

    def loss(p):
        logits, sown = model.apply({"params": p}, images, deterministic=False, rngs={"dropout": key(3)},
                                   mutable=["losses"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)), sown

    def run(p):
        grads, sown = jax.grad(loss, has_aux=True)(p)
        logits, inter = model.apply({"params": p}, images, mutable=["intermediates"])
        return grads, sown.get("losses", {}), logits, inter["intermediates"]["token_sizes"][0]

    return (params,) + jax.jit(run)(params)


def assert_model(**tokens):
    """A ViT with ``tokens`` on: every param of the method's Reducers gets a finite, non-zero gradient through
    the model loss, and the jitted inference forward is finite. Returns ``({path: grad} of the Reducers, sown
    losses, final token sizes)``."""
    params, grads, losses, logits, sizes = model_run(**tokens)
    found = reducer_params(grads)
    if spec(tokens["method"]).learned:
        assert found, "the method created no params"
    for path, grad in found.items():
        assert np.all(np.isfinite(grad)), path
        assert np.any(np.asarray(grad) != 0), f"{path} gets no gradient"
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    return found, losses, sizes


def start(batch, n, seed=0, width=8, mask=None):
    x = jax.random.normal(key(seed), (batch, n, width))
    return x, TokenState.start(batch, n, mask)


def assert_kept(x, tokens, out, new, keep, prefix):
    """``keep`` tokens, prefix tokens first and unchanged, the source map consistent with a gather of x."""
    assert out.shape == (x.shape[0], keep, x.shape[2]) and new.sizes.shape == (x.shape[0], keep)
    np.testing.assert_array_equal(out[:, :prefix], x[:, :prefix])
    np.testing.assert_array_equal(new.source[:, :prefix], np.broadcast_to(np.arange(prefix), (x.shape[0], prefix)))
    source = np.asarray(new.source)
    for b in range(x.shape[0]):
        slots = source[b][source[b] >= 0]
        assert sorted(slots.tolist()) == list(range(keep))  # one original per kept slot (pruning)
