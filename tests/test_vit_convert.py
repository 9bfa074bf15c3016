"""The vit family and its timm / Hugging Face import (effjax.models.convert) against fixtures torch wrote.

tests/fixtures/make_vit_fixtures.py wrote the checkpoints and their torch eval logits; nothing here imports torch.
"""

import functools
import json
import pathlib
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from helpers import slow_after

from effjax import models
from effjax.models import convert, vit

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "vit"
SHRINK = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)  # the fixtures' models
VIT, DEIT = "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"

# sum(p.numel() for p in timm.create_model(name).parameters()) with timm 1.0.31.
TIMM_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656, "vit_large_patch16_224": 304_326_632,
    "deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656, "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432, "deit_base_distilled_patch16_224": 87_338_192,
}
# (embed_dim, depth, num_heads) of timm's model_args.
TIMM_SHAPES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def images():
    return np.load(FIXTURES / "inputs.npy")


def reference(name):
    return np.load(FIXTURES / f"{name}_logits.npy")


@functools.partial(jax.jit, static_argnums=0)
def run(model, variables, x):
    """``model.apply``, compiled once per distinct model (equal fields hash equal; ``tokens`` dicts do not hash)."""
    return model.apply(variables, x)


@functools.cache
def converted(path: str, name: str, **overrides):
    model, variables = convert.from_timm(FIXTURES / path, name, **{**SHRINK, **overrides})
    return model, variables, np.asarray(run(model, variables, images()))


CASES = [("timm_vit.safetensors", VIT, "timm_vit"),
         ("timm_deit_distilled.safetensors", DEIT, "timm_deit_distilled"),
         ("hf_vit", VIT, "hf_vit"),  # a snapshot directory: model.safetensors + config.json
         ("hf_deit/model.safetensors", DEIT, "hf_deit")]


@pytest.mark.parametrize("path,name,logits", CASES, ids=[c[2] for c in CASES])
def test_logits_match_torch(path, name, logits):
    model, variables, out = converted(path, name)
    np.testing.assert_allclose(out, reference(logits), atol=1e-4, rtol=0)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    assert model.distilled == (name == DEIT)


@pytest.mark.parametrize("path,name,logits,tol", [
    ("timm_vit_fp16.safetensors", VIT, "timm_vit", 5e-3),
    ("timm_deit_distilled_bf16.safetensors", DEIT, "timm_deit_distilled", 3e-2),
], ids=["float16", "bfloat16"])
def test_half_precision_files(path, name, logits, tol):
    stored = convert.read_safetensors(FIXTURES / path)
    assert {a.dtype for a in stored.values()} == {np.dtype(np.float16 if "fp16" in path else ml_dtypes.bfloat16)}
    _, variables, out = converted(path, name)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    # torch's logits of the same rounded weights (exact in float32), then the float32 original's at the
    # file's precision.
    np.testing.assert_allclose(out, reference(path.removesuffix(".safetensors")), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out, reference(logits), atol=tol, rtol=0)


def test_hf_layer_norm_eps(tmp_path):
    # hf_deit's config.json sets layer_norm_eps=1e-3: read from it, and it matters at this tolerance.
    model, variables, _ = converted("hf_deit/model.safetensors", DEIT)
    assert model.norm_eps == 1e-3
    wrong = run(model.clone(norm_eps=1e-6), variables, images())
    assert np.abs(np.asarray(wrong) - reference("hf_deit")).max() > 1e-3
    # Without a config.json, Hugging Face's default 1e-12.
    shutil.copy(FIXTURES / "hf_vit" / "model.safetensors", tmp_path / "model.safetensors")
    model, _ = convert.from_timm(tmp_path / "model.safetensors", VIT, **SHRINK)
    assert model.norm_eps == convert.HF_DEFAULT_NORM_EPS


def test_features_without_head():
    model, variables = vit.load(FIXTURES / "timm_deit_distilled.safetensors", DEIT, **{**SHRINK, "num_classes": 0})
    assert "head" not in variables["params"]
    assert jax.jit(model.apply)(variables, images()).shape == (3, 48)


@pytest.mark.parametrize("path,name", slow_after([
    pytest.param("timm_deit_distilled.safetensors", DEIT, id="cls+dist"),
    pytest.param("timm_vit.safetensors", VIT, id="cls")]))
def test_token_reduction(path, name):
    model, variables, out = converted(path, name)
    reduced = model.clone(tokens=dict(method="tome", r=2))
    logits, state = jax.jit(functools.partial(reduced.apply, mutable="intermediates"))(variables, images())
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    sizes = state["intermediates"]["token_sizes"][0]
    assert sizes.shape == (3, 16 + model.prefix_tokens - 2 * 2)  # 16 patches + prefix, 2 merged per layer
    np.testing.assert_array_equal(sizes[:, :model.prefix_tokens], 1.0)  # CLS (and distillation) never merged
    np.testing.assert_allclose(sizes.sum(1), 16 + model.prefix_tokens)
    unreduced = jax.jit(model.clone(tokens=dict(method="tome", r=0)).apply)(variables, images())
    np.testing.assert_array_equal(np.asarray(unreduced), out)


def test_variant_fields():
    assert set(vit.VARIANTS) == set(TIMM_PARAMS)
    for name in vit.VARIANTS:
        model = vit.variant(name)
        size = next(s for s in TIMM_SHAPES if f"_{s}_" in name)
        assert (model.embed_dim, model.num_layers, model.num_heads) == TIMM_SHAPES[size], name
        assert (model.mlp_dim, model.num_classes, model.image_size, model.patch_size) == \
            (4 * model.embed_dim, 1000, (224, 224), 16), name
        assert model.distilled == ("distilled" in name) and model.prefix_tokens == 1 + model.distilled
        assert (model.qkv_bias, model.activation, model.norm_eps) == (True, "gelu_exact", 1e-6)
        assert model.dropout_rate == model.attention_dropout_rate == 0.0


# The quoted ViT-B and DeiT-S counts and a distilled one in the default tier, the other variants in the slow one.
COUNTED = ["vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224"]


@pytest.mark.parametrize("name", slow_after(COUNTED + [n for n in TIMM_PARAMS if n not in COUNTED], keep=3))
def test_variant_parameter_count(name):
    model = vit.variant(name)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
    abstract = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, jax.random.key(0)), images))
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract)) == TIMM_PARAMS[name]
    if name == COUNTED[0]:
        logits = jax.eval_shape(model.apply, abstract, images)
        assert logits.shape == (2, 1000) and logits.dtype == np.float32


def test_variant_overrides_and_build():
    model = vit.variant("deit_small_patch16_224", img_size=(64, 32), embed_dim=96, mlp_ratio=2, depth=3,
                        in_chans=1, drop_rate=0.1, dtype=np.float32)
    assert (model.image_size, model.embed_dim, model.mlp_dim, model.num_layers, model.channels,
            model.dropout_rate) == ((64, 32), 96, 192, 3, 1, 0.1)
    assert vit.variant(VIT, embed_dim=96).mlp_dim == 384  # the variant's mlp_ratio 4 follows the width
    built = models.build("vit", vocab_size=257, num_classes=5, image_size=(16, 16), patch_size=4, channels=1,
                         num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32)
    assert models.task_of("vit") == "classification"
    pixels = jax.ShapeDtypeStruct((2, 256), np.int32)  # the image sources' pixel tokens, 16 x 16 x 1
    variables = jax.eval_shape(functools.partial(built.init, jax.random.key(0)), pixels)
    assert jax.eval_shape(built.apply, variables, pixels).shape == (2, 5)


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_name_and_override_errors():
    with pytest.raises(ValueError) as e:
        vit.variant("vit_smal_patch16_224")
    one_line(e, "vit_smal_patch16_224", "Did you mean 'vit_small_patch16_224'")
    with pytest.raises(ValueError) as e:
        vit.variant(VIT, depht=3)
    one_line(e, "depht", "depth")
    with pytest.raises(ValueError) as e:
        vit.variant(VIT, drop_path_rate=0.1)
    one_line(e, "drop_path_rate")
    with pytest.raises(ValueError) as e:
        convert.from_timm(FIXTURES / "timm_vit.safetensors", "vit_tiny_patch8_224")
    one_line(e, "vit_tiny_patch8_224", "Did you mean")
    model = vit.variant(VIT, **SHRINK)
    with pytest.raises(ValueError) as e:
        model.init(jax.random.key(0), np.zeros((1, 3, 32, 32), np.float32))
    one_line(e, "channels last", "transpose")
    with pytest.raises(ValueError) as e:
        vit.variant(VIT, **SHRINK, global_pool="avg").init(jax.random.key(0), images())
    one_line(e, "global_pool='avg'")


def edited(tmp_path, source, edit, name="edited.safetensors"):
    """A copy of fixture ``source`` with ``edit(tensors)`` applied."""
    tensors = dict(convert.read_checkpoint(FIXTURES / source))
    edit(tensors)
    path = tmp_path / name
    convert.write_safetensors(path, tensors)
    return path


def test_missing_and_misshaped_tensors(tmp_path):
    path = edited(tmp_path, "timm_vit.safetensors", lambda t: t.pop("blocks.1.attn.proj.bias"))
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(path, VIT, **SHRINK)
    one_line(e, "missing tensor 'blocks.1.attn.proj.bias'", "[48]")
    path = edited(tmp_path, "hf_vit/model.safetensors",
                  lambda t: t.pop("vit.encoder.layer.0.intermediate.dense.weight"))
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(path, VIT, **SHRINK)
    one_line(e, "missing tensor 'vit.encoder.layer.0.intermediate.dense.weight'", "[192, 48]")
    path = edited(tmp_path, "timm_vit.safetensors",
                  lambda t: t.update({"blocks.0.mlp.fc1.weight": np.zeros((96, 48), np.float32)}))
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(path, VIT, **SHRINK)
    one_line(e, "'blocks.0.mlp.fc1.weight' has shape [96, 48]", "expects [192, 48]", "mlp_ratio=2")
    path = edited(tmp_path, "timm_vit.safetensors", lambda t: t.update({"blocks.0.ls1.gamma": np.ones(48, np.float32)}))
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(path, VIT, **SHRINK)
    one_line(e, "'blocks.0.ls1.gamma'", "would not be used")


@pytest.mark.parametrize("overrides,needles", [
    (dict(num_classes=5), ["'head.weight' has shape [10, 48]", "expects [5, 48]", "num_classes=10"]),
    (dict(img_size=64), ["'pos_embed' has shape [1, 17, 48]", "expects [1, 65, 48]", "img_size=32"]),
    (dict(patch_size=4), ["'patch_embed.proj.weight' has shape [48, 3, 8, 8]", "patch_size=8"]),
    (dict(depth=3), ["2 blocks", "depth 3", "depth=2"]),
    (dict(embed_dim=192, num_heads=3), ["'patch_embed.proj.weight' has shape [48, 3, 8, 8]",
                                        "expects [192, 3, 8, 8]", "48 wide"]),
], ids=["classes", "image", "patch", "depth", "width"])
def test_wrong_size_errors(overrides, needles):
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(FIXTURES / "timm_vit.safetensors", VIT, **{**SHRINK, **overrides})
    one_line(e, *needles)


def test_other_checkpoint_errors(tmp_path):
    # A ViT-B file (its first tensors at their real shapes) given a ViT-S name.
    base = {"patch_embed.proj.weight": np.zeros((768, 3, 16, 16), np.float16), "patch_embed.proj.bias":
            np.zeros(768, np.float16), "cls_token": np.zeros((1, 1, 768), np.float16), "blocks.11.norm1.weight":
            np.ones(768, np.float16)}
    convert.write_safetensors(tmp_path / "vit_b.safetensors", base)
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "vit_b.safetensors", "vit_small_patch16_224")
    one_line(e, "'patch_embed.proj.weight' has shape [768, 3, 16, 16]", "expects [384, 3, 16, 16]",
             "vit_base_patch16_224")
    # A ResNet state dict.
    resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "bn1.weight": np.ones(64, np.float32),
              "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32), "fc.weight": np.zeros((1000, 2048))}
    convert.write_safetensors(tmp_path / "resnet.safetensors", resnet)
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "resnet.safetensors", "vit_base_patch16_224")
    one_line(e, "not a ViT/DeiT checkpoint", "ResNet", "patch_embed.proj.weight")
    # A distilled DeiT given a plain ViT name, and a plain ViT given a distilled name.
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(FIXTURES / "timm_deit_distilled.safetensors", VIT, **SHRINK)
    one_line(e, "distilled", "dist_token", "deit_*_distilled_*")
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(FIXTURES / "hf_vit", DEIT, **SHRINK)
    one_line(e, "missing tensor 'vit.embeddings.distillation_token'", "not a distilled DeiT")
    # A Hugging Face config.json whose head count differs from the name's.
    shutil.copytree(FIXTURES / "hf_vit", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "hf", VIT, **SHRINK)
    one_line(e, "num_attention_heads=4", "num_heads=4")


def test_file_errors(tmp_path, monkeypatch):
    (tmp_path / "model.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "model.pth", VIT)
    one_line(e, "model.pth", "torch", "safetensors")
    (tmp_path / "cut.safetensors").write_bytes((FIXTURES / "timm_vit.safetensors").read_bytes()[:5000])
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "cut.safetensors", VIT)
    one_line(e, "cut.safetensors", "damaged")
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path / "absent.safetensors", VIT)
    one_line(e, "absent.safetensors", "no such file")
    with pytest.raises(convert.CheckpointError) as e:
        convert.from_timm(tmp_path, VIT)
    one_line(e, "model.safetensors")


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((2, 3)).astype(np.float32), "f16": np.arange(5, dtype=np.float16),
               "bf16": rng.standard_normal(4).astype(ml_dtypes.bfloat16), "i64": np.arange(3),
               "u8": np.arange(7, dtype=np.uint8), "scalar": np.float32(2.5)}
    convert.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "np"})
    back = convert.read_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == np.asarray(array).dtype and back[name].shape == np.shape(array)
        np.testing.assert_array_equal(back[name], array)
