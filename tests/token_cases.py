"""Shared inputs of the token-reduction tests: random tokens with attention q/k/v, float64 attention for the naive
references, a Reducer call, and the small ViT every method is checked inside."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effjax.models as models
from effjax.tokens import TokenState, registry
from effjax.tokens.stats import AttentionStats


def random_case(seed, batch=2, n=16, d=16, heads=2, head_dim=4, padded=0):
    """``(x, (q, k, v), TokenState)``: random features, attention inputs and sizes in 1..3 (0 on the last
    ``padded`` tokens, which the mask marks)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, n, d))
    q, k, v = (jax.random.normal(key, (batch, n, heads, head_dim)) for key in keys[1:4])
    sizes = jax.random.randint(keys[4], (batch, n), 1, 4).astype(jnp.float32)
    mask = None
    if padded:
        mask = jnp.broadcast_to(jnp.arange(n) < n - padded, (batch, n))
        sizes = sizes * mask
    source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    return x, (q, k, v), TokenState(sizes, source, mask)


def run(method, x, qkv, tokens, keep, prefix, variables=None, **params):
    """The method's Reducer on ``x`` with the block statistics of ``qkv``."""
    stats = AttentionStats(*qkv, mask=tokens.mask)
    return registry.make(method, **params).apply(variables or {}, x, tokens, stats, keep=keep, prefix=prefix)


@functools.cache
def _jitted(method, keep, prefix, params):
    return jax.jit(lambda x, tokens, qkv: run(method, x, qkv, tokens, keep, prefix, **dict(params)))


def jit_run(method, x, qkv, tokens, keep, prefix, **params):
    """``run`` compiled once per method, ``keep``, ``prefix`` and params (and shape)."""
    return _jitted(method, keep, prefix, tuple(sorted(params.items())))(x, tokens, qkv)


def probabilities(q, k):
    """Softmax attention [batch, heads, n, n] in float64 numpy, as the naive references read it."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = logits - logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def vit(**kw):
    fields = dict(vocab_size=1, num_classes=10, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, pooling="cls",
                  image_size=(16, 16), channels=3, patch_size=4)
    return models.build("vit_classifier", **{**fields, **kw})


def random_variables(model, *args):
    """Random parameters of ``model`` at its init shapes (compiling a ViT's init costs ~10 s of CPU, its apply ~2)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(1), *args)
    return jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def check_in_vit(method, needs_probabilities: bool, attention="softmax", **tokens):
    """The method inside a 2-layer ViT (r=2 unless ``tokens`` says otherwise) with ``attention``: init and apply
    give finite logits; under performer attention a method that needs the probabilities is refused in one line.
    Returns the model, its random variables, the images and the sown intermediates (token_sizes, token_source)."""
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    spec = {"method": method, "r": 2, **tokens}
    model = vit(tokens=spec, attention=attention)
    variables = random_variables(model, images)
    logits, inter = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    performer = vit(tokens=spec, attention="performer")
    if needs_probabilities:
        with pytest.raises(ValueError, match=f"token method '{method}' needs the attention probabilities") as err:
            jax.eval_shape(performer.init, jax.random.key(1), images)
        assert "\n" not in str(err.value)
    return model, variables, images, inter["intermediates"]
