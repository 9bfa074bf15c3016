"""Numerics the Pallas kernels and the plain-JAX methods must share exactly."""

import jax.numpy as jnp


def guarded_divide(num, den, eps: float):
    """``num / den`` with ``2 * eps`` added to the denominators at most ``eps`` in magnitude, broadcast over
    num's last axis (``den`` has one axis fewer).

    This is Performer's guard (``numerical_stabilizer``, Choromanski et al. 2021, official FAVOR+ code): a
    denominator of real size is never biased, which matters where the features are stabilised (Performer's
    max-shifted exp features give denominators of 1e-3 to 1e-5, where ``den + 1e-6`` moved outputs by up to
    1e-2), and a row that sees no key (``den == 0``, ``num == 0``) gives 0 rather than NaN.
    """
    den = den + 2.0 * eps * (jnp.abs(den) <= eps)
    return num / den[..., None]
