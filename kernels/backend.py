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


def guarded_reason(op: str, call: dict, ops, reason) -> str | None:
    """A backend's ``supports``: "no <op> kernel" for an op not in ``ops``, else ``reason(call)``, and any error
    while checking becomes the reason (``supports`` must never raise)."""
    if op not in ops:
        return f"no {op} kernel"
    try:
        return reason(call)
    except Exception as error:  # noqa: BLE001
        return f"cannot check the call ({type(error).__name__}: {error})"
