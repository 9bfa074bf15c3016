"""Which implementation runs where: the ``impl`` switch and Pallas' interpret mode."""

import jax

IMPLS = ("xla", "pallas")


def check_impl(method: str, impl: str) -> None:
    """Raises ValueError naming ``method`` when ``impl`` is not one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"{method}: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}.")


def interpret_default(interpret=None) -> bool:
    """``interpret`` if given, else True off-accelerator (CPU), where Pallas kernels can only be interpreted."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() == "cpu"
