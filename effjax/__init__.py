"""effjax: efficient transformers in JAX/Flax. ``effjax.generate`` samples from a decoder LM
(``effjax.inference.generate``); the rest lives in the subpackages (attention, models, train, search, ...)."""


def __getattr__(name):
    if name in ("generate", "Generated"):  # imported on first use: ``import effjax`` stays free of jax
        import effjax.inference

        return getattr(effjax.inference, name)
    raise AttributeError(f"module 'effjax' has no attribute {name!r}")
