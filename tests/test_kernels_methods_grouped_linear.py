"""impl="pallas" against impl="xla" for the grouped softmax methods (flash per group, block-sparse frame tiles)
and the remaining linear methods (chunked linear attention): outputs and gradients, padding, segments, causal,
fully padded groups and the errors. Interpret mode on CPU; sizes are small to keep the file fast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import assert_tree_close, value_and_grads_of

from effjax.attention import (
    attention_tile,
    flat_window,
    performer_relu,
    rala,
    slab_sla,
    sliced_group,
    subregion,
)
from effjax.kernels import triton_backend

IMPLS = ("xla", "pallas")


def qkv(seed, length, heads=2, dim=16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, cot = (jax.random.normal(kk, (2, length, heads, dim)) for kk in keys)
    return q, k, v, cot


def lengths_mask(lengths, n):
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def segments(length):
    """Row 0: three packed segments (7, 15, rest); row 1: one."""
    row0 = np.repeat([1, 2, 3], [7, 15, length - 22])
    return np.stack([row0, np.ones(length, int)]).astype(np.int32)


def pallas_vs_xla(make, length, *, seed=0, mask=None, segment_ids=None, causal=False, rtol=1e-5, atol=1e-5):
    """``make(impl)`` is a linen module; its output and q/k/v gradients under both impls, compared."""
    q, k, v, cot = qkv(seed, length)
    variables = make("xla").init(jax.random.key(1), q, k, v)
    results = []
    for impl in IMPLS:
        module = make(impl)

        def fn(q, k, v, module=module):
            return module.apply(variables, q, k, v, mask=mask, segment_ids=segment_ids, causal=causal)

        assert ("pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))) == (impl == "pallas")
        results.append(value_and_grads_of(fn, [q, k, v], cot))
    assert_tree_close(results[1], results[0], rtol, atol)
    return results


# --- grouped softmax: flash per group, block-sparse frame tiles ------------------------------------------------

INTERPRETED = pytest.mark.skipif(jax.default_backend() == "gpu", reason="blocks below 16 run interpreted only")
GROUPED = [  # group sizes 12, 20, 24 (padded); frames of 16, and of 12 (kernel block 4)
    pytest.param(lambda impl: sliced_group.Attention(groups=4, shuffle=True, impl=impl), 48, id="sliced_group"),
    pytest.param(lambda impl: subregion.Attention(ratio=2, chunk=4, impl=impl), 40, id="subregion"),
    pytest.param(lambda impl: flat_window.Attention(window=(4, 4), group_size=24, shift=True, impl=impl), 64,
                 id="flat_window_padded_groups"),
    pytest.param(lambda impl: attention_tile.Attention(num_frames=4, impl=impl), 64, id="attention_tile"),
    pytest.param(lambda impl: attention_tile.Attention(frame_len=12, num_global_frames=2, impl=impl), 48,
                 id="attention_tile_block_4", marks=INTERPRETED),
]


@pytest.mark.parametrize("make,length", slow_after(GROUPED))
def test_grouped_pallas_equals_xla_with_padding_and_segments(make, length):
    pallas_vs_xla(make, length, mask=lengths_mask([length - 13, length], length), segment_ids=segments(length))


@pytest.mark.slow
def test_group_with_every_key_padded_gets_the_mean_of_its_values():
    # Row 0 pads tokens 0-7 and 24-31: sliced_group's first and last groups of 8, and attention_tile's global
    # frame 0 and frame 3 (which sees only frames 0 and 3). Both paths give those queries the mean of the values
    # they may see.
    mask = np.ones((2, 32), bool)
    mask[0, :8] = mask[0, 24:] = False
    _, _, v, _ = qkv(3, 32)

    def mean_of(rows):
        return jnp.broadcast_to(v[0, rows].mean(0), (8, 2, 16))

    (out, _), _ = pallas_vs_xla(lambda impl: sliced_group.Attention(groups=4, impl=impl), 32, seed=3, mask=mask)
    np.testing.assert_allclose(out[0, :8], mean_of(np.r_[:8]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0, 24:], mean_of(np.r_[24:32]), rtol=1e-5, atol=1e-6)
    (out, _), _ = pallas_vs_xla(lambda impl: attention_tile.Attention(frame_len=8, impl=impl), 32, seed=3, mask=mask)
    np.testing.assert_allclose(out[0, 24:], mean_of(np.r_[:8, 24:32]), rtol=1e-5, atol=1e-6)


def test_attention_tile_layout_is_the_frame_mask():
    layout = attention_tile.frame_layout(4, 1)
    expected = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(layout, expected)


def test_grouped_errors(monkeypatch):
    q, k, v, _ = qkv(4, 32)
    with pytest.raises(ValueError, match="flat_window: Unknown kernel backend"):
        flat_window.attend(q, k, v, grid_hw=(4, 8), group_size=8, impl="cuda")
    with pytest.raises(ValueError, match="attention_tile: Unknown kernel backend"):
        attention_tile.attend(q, k, v, num_frames=2, impl="cuda")
    with pytest.raises(ValueError, match=r"subregion: no backend .*\(triton: head_dim must be a power of two"):
        subregion.attend(q[..., :12], k[..., :12], v[..., :12], ratio=2, impl="pallas")
    # Compiled kernels need blocks >= 16: frames of 12 tokens give a block of 4 (interpret mode runs it).
    monkeypatch.setattr(triton_backend, "interpret_default", lambda interpret=None: False)
    with pytest.raises(ValueError, match=r"attention_tile: .*\(triton: block_size 4 is below the compiled kernels'"):
        attention_tile.attend(*(jnp.zeros((1, 48, 1, 16)),) * 3, frame_len=12, impl="pallas")


# --- linear family: chunked linear attention ------------------------------------------------------------------

LINEAR = [  # length 40 is not a multiple of the chunk (16); the grid methods take 64 = 8 x 8
    pytest.param(lambda impl: performer_relu.Attention(num_features=16, chunk_size=16, impl=impl), 40, False,
                 id="performer_relu"),
    pytest.param(lambda impl: performer_relu.Attention(num_features=16, chunk_size=16, impl=impl), 40, True,
                 id="performer_relu_causal"),
    pytest.param(lambda impl: slab_sla.Attention(kernel_size=3, impl=impl), 64, False, id="slab_sla"),
    pytest.param(lambda impl: rala.Attention(impl=impl), 64, False, id="rala_rope"),
    pytest.param(lambda impl: rala.Attention(rope=False, lepe=False, impl=impl), 64, False, id="rala_no_rope"),
]


@pytest.mark.parametrize("make,length,causal", slow_after(LINEAR))
def test_linear_pallas_equals_xla_with_padding(make, length, causal):
    pallas_vs_xla(make, length, mask=lengths_mask([length - 11, length], length), causal=causal)


def test_linear_errors():
    q, k, v, _ = qkv(5, 16)
    with pytest.raises(NotImplementedError, match=r"performer_relu: no backend in impl='pallas' can "
                       r"run this linear call \(triton: segment_ids"):
        performer_relu.attend(q, k, v, segment_ids=np.ones((2, 16), np.int32), impl="pallas")
    with pytest.raises(ValueError, match="rala: Unknown kernel backend"):
        rala.attend(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="slab_sla: Unknown kernel backend"):
        slab_sla.attend(q, k, v, jnp.zeros((3, 3, 16)), impl="cuda")
