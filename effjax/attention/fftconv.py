"""Convolutions along the length axis (and over a 2-D grid) for long-convolution mixers, in float32.

FFT forms (catalog Sec. 23.4): a linear convolution equals a product of DFTs once both signals are zero-padded to
at least the length of the full convolution, so the circular wrap-around never folds into the kept outputs.
  * ``causal``: ``y_t = sum_{s<=t} h_s x_{t-s}`` (Hyena's ``fftconv_ref``: pad to 2L, keep the first L);
  * ``toeplitz``: ``y_t = sum_s c_{t-s} x_s`` with any offsets, also rectangular (kernelized RPE's Toeplitz
    products, Luo et al. 2021 Sec. 3.2), and ``two_sided`` built on it (safari's bidirectional long conv);
  * ``causal2d``: the quadrant 2-D conv of Hyena N-D's ``fftconv2d`` (pad to 2H x 2W, keep ``[:H, :W]``).
``short_causal`` is the direct (no FFT) depthwise conv of a few taps that Hyena and Mamba put before their
long mixers. All take ``x [batch, length, *channels]`` and kernels ``[taps, *channels]`` that broadcast against
the channels, and return float32.
"""

import jax.numpy as jnp

NAME = "fftconv"


def _fit(kernel, taps: int):
    """``kernel`` cut or zero-padded along axis 0 to ``taps`` entries."""
    kernel = kernel.astype(jnp.float32)
    if kernel.shape[0] >= taps:
        return kernel[:taps]
    return jnp.pad(kernel, [(0, taps - kernel.shape[0])] + [(0, 0)] * (kernel.ndim - 1))


def causal(x, kernel):
    """``y_t = sum_{s=0}^{t} kernel[s] x_{t-s}``; ``kernel [taps, *channels]`` (taps beyond the length unused)."""
    length = x.shape[1]
    kernel = _fit(kernel, min(kernel.shape[0], length))
    n = length + kernel.shape[0]  # >= the full convolution's length L + taps - 1
    xf = jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(kernel, n=n, axis=0)
    return jnp.fft.irfft(xf * kf, n=n, axis=1)[:, :length]


def toeplitz(x, kernel, out_len: int | None = None):
    """``y_t = sum_s kernel[t - s + in_len - 1] x_s`` for ``t < out_len``, ``s < in_len``: a Toeplitz mat-vec.

    ``kernel [out_len + in_len - 1, *channels]`` lists the offsets ``t - s`` from ``-(in_len - 1)`` to
    ``out_len - 1``. Computed as the middle ``out_len`` outputs of the full linear convolution.
    """
    in_len = x.shape[1]
    out_len = in_len if out_len is None else out_len
    if kernel.shape[0] != out_len + in_len - 1:
        raise ValueError(f"{NAME}.toeplitz: kernel must have out_len + in_len - 1 = {out_len + in_len - 1} "
                         f"offsets, got {kernel.shape[0]}.")
    n = out_len + in_len
    xf = jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(kernel.astype(jnp.float32), n=n, axis=0)
    return jnp.fft.irfft(xf * kf, n=n, axis=1)[:, in_len - 1:in_len - 1 + out_len]


def two_sided(x, forward, backward):
    """``y_t = sum_{s<=t} forward[t-s] x_s + sum_{s>t} backward[s-t-1] x_s`` (each kernel ``[taps, *channels]``).

    The zero offset belongs to ``forward`` only, as in safari's bidirectional ``LongConv``.
    """
    length = x.shape[1]
    kernel = jnp.concatenate([jnp.flip(_fit(backward, length - 1), axis=0), _fit(forward, length)], axis=0)
    return toeplitz(x, kernel)


def causal2d(x, kernel):
    """Quadrant-causal 2-D conv ``y[i, j] = sum_{a<=i, b<=j} kernel[i-a, j-b] x[a, b]``.

    ``x [batch, h, w, *channels]``, ``kernel [kh, kw, *channels]`` (taps beyond the grid unused). Flip both
    axes of ``x`` and of the result for the bottom-right-anchored form.
    """
    h, w = x.shape[1:3]
    kernel = kernel.astype(jnp.float32)[:h, :w]
    size = (h + kernel.shape[0], w + kernel.shape[1])
    xf = jnp.fft.rfft2(x.astype(jnp.float32), s=size, axes=(1, 2))
    kf = jnp.fft.rfft2(kernel, s=size, axes=(0, 1))
    return jnp.fft.irfft2(xf * kf, s=size, axes=(1, 2))[:, :h, :w]


def short_causal(x, taps, bias=None, segment_ids=None):
    """Direct depthwise causal conv ``y_t = bias + sum_s taps[s] x_{t-s}`` over a few ``taps [k, *channels]``.

    With ``segment_ids [batch, length]``, tap s contributes only when ``x_{t-s}`` is in the same run of equal ids
    as ``x_t``, so no segment reads another (an A-B-A pack with a B shorter than the taps included).
    """
    x = x.astype(jnp.float32)
    length = x.shape[1]
    if segment_ids is not None:
        ids = jnp.asarray(segment_ids)
        segment_ids = jnp.cumsum(jnp.pad(ids[:, 1:] != ids[:, :-1], [(0, 0), (1, 0)]).astype(jnp.int32), axis=1)
    y = jnp.zeros_like(x)
    for s in range(min(taps.shape[0], length)):
        shifted = jnp.pad(x, [(0, 0), (s, 0)] + [(0, 0)] * (x.ndim - 2))[:, :length]
        if segment_ids is not None and s > 0:
            same = segment_ids == jnp.pad(segment_ids, [(0, 0), (s, 0)], constant_values=-1)[:, :length]
            shifted = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), shifted, 0.0)
        y = y + taps[s].astype(jnp.float32) * shifted
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y
