"""Pallas kernels for effjax's hot loops, each beside the plain-JAX reference it must match.

Attention methods select one with ``impl="pallas"`` (default ``"xla"``: the plain-JAX path). On CPU the
kernels run with ``interpret=True``, which is how CI tests them; on GPU they lower through Triton or
Mosaic GPU.
"""
