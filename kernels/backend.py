"""Which implementation runs where: the ``impl`` check and Pallas' interpret mode."""

import jax


def check_impl(method: str, impl) -> None:
    """Raises a one-line ValueError naming ``method`` when ``impl`` is not a valid ``dispatch`` spec."""
    from effjax.kernels import dispatch

    try:
        dispatch.parse(impl)
    except ValueError as error:
        raise ValueError(f"{method}: {error}") from None


def interpret_default(interpret=None) -> bool:
    """``interpret`` if given, else True off-accelerator (CPU), where Pallas kernels can only be interpreted."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() == "cpu"
