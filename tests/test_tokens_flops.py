"""The catalog's offline FLOP figures, from the schedules: analytically and from XLA's cost analysis."""

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import slow_after

import effjax.models as models
from effjax.tokens import flops, schedule, spec

PATCH = 16 * 16 * 3  # MACs per patch and channel of the patch embedding


def gmacs(embed, counts, place="attention"):
    return flops.vit_macs(197, counts, embed, place=place, patch_macs=196 * PATCH * embed) / 1e9


def tome_counts(r):
    return (None,) * 12 if r is None else schedule.counts(197, 1, 12, r=r, max_removed=spec("tome").max_removed)


@pytest.mark.parametrize("embed,r,expected", [
    (768, None, 17.56), (768, 16, 8.77), (768, 13, 10.37), (768, 8, 13.10), (768, "(16,-1)", 5.86),
    (384, None, 4.60), (384, 16, 2.29), (384, 13, 2.70),
])
def test_tome_gmacs_of_vit_b16_and_deit_s_match_the_catalog(embed, r, expected):
    assert gmacs(embed, tome_counts(r)) == pytest.approx(expected, abs=0.006)


def test_dynamicvit_keep_ratio_gives_its_published_gflops_on_deit_s():
    counts = schedule.counts(197, 1, 12, keep=0.7, layers="3,6,9")
    assert gmacs(384, counts, place="block") == pytest.approx(2.88, abs=0.005)  # README: 2.9 G


@functools.cache
def xla_gmacs(r):
    model = models.build("vit_classifier", vocab_size=1, num_classes=1000, num_layers=12, embed_dim=768,
                         num_heads=12, mlp_dim=3072, image_size=(224, 224), channels=3, patch_size=16,
                         pooling="cls", qkv_bias=True, dropout_rate=0.0,
                         tokens=None if r is None else dict(method="tome", r=r))
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.jit(model.apply).lower(variables, images).cost_analysis()["flops"] / 2e9


@pytest.mark.parametrize("r,ratio", slow_after([(16, 0.50), (13, 0.59), (8, 0.75), ("(16,-1)", 0.33)], keep=0))
def test_xla_cost_analysis_of_vit_b16_under_tome_gives_the_catalogs_flop_ratio(r, ratio):
    measured = xla_gmacs(r) / xla_gmacs(None)
    assert measured == pytest.approx(ratio, abs=0.005)
    # XLA also counts the norms, softmax, merging and head: within 1% of the analytic count.
    assert measured == pytest.approx(gmacs(768, tome_counts(r)) / gmacs(768, tome_counts(None)), rel=0.01)
