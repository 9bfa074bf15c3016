"""The decoder LM and greedy step that the decoding benchmarks (``decode.py``, ``decode_fill.py``) time."""


def decoder_lm_for(method: str, max_length: int, *, layers=2, embed=128, heads=4, mlp=512, vocab=256):
    """The benchmark's decoder LM for ``method`` (float32, no dropout) and its params: ``(model, variables)``.

    Methods whose params are sized by a max_length (hyena's filter, kernelized_rpe's offsets) take ``max_length``,
    as the model's learned positions do; the others ignore it."""
    import jax
    import jax.numpy as jnp

    from effjax import attention
    from effjax.models import decoder_lm

    params = {"max_length": max_length} if "max_length" in attention.defaults(method) else None
    model = decoder_lm.Model(vocab_size=vocab, max_length=max_length, num_layers=layers, embed_dim=embed,
                             num_heads=heads, mlp_dim=mlp, attention=method, attention_params=params,
                             dropout_rate=0.0)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def greedy_step(model):
    """One greedy decoding step ``(variables, token [B], cache, position [B]) -> (next token, cache, position + 1)``."""
    import jax.numpy as jnp

    def step(variables, token, cache, position):
        logits, cache = model.apply(variables, token[:, None], cache=cache, positions=position)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache, position + 1

    return step
