"""timm and Hugging Face ViT/DeiT checkpoints into ``effjax.models.vit`` (the family's ``load``), without torch.

``from_timm(path, name, **overrides)`` reads a checkpoint, finds its format from the tensor names (timm's
``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``...; Hugging Face's
``vit.embeddings.patch_embeddings.projection.weight``, ``vit.encoder.layer.0.attention.attention.query.weight``...,
or the same with ``deit.``, or with no prefix for a bare ``ViTModel``; transformers 5's in-memory names
``vit.layers.0.attention.q_proj.weight``... too), builds ``vit.variant(name, **overrides)`` and maps every tensor
onto its parameters in float32, so ``model.apply(variables, images)`` gives the source model's eval logits for
the same normalised images, channels last.

Files: ``.safetensors`` (read here: an 8-byte little-endian header length, a JSON header of dtype, shape and
``data_offsets`` per tensor, then the raw little-endian buffer; float16 and bfloat16 through ``ml_dtypes``), a
sharded ``model.safetensors.index.json``, a Hugging Face snapshot directory (its ``model.safetensors``), and
``.pth``/``.pt``/``.bin`` through torch when torch is importable. A ``config.json`` beside a Hugging Face file
gives ``layer_norm_eps`` (Hugging Face's default is 1e-12, timm's 1e-6; the model's ``norm_eps``) and is checked
for the head count, which the tensors do not show. Nothing is downloaded. Every problem is one line
(``CheckpointError``): the first missing or mis-shaped tensor with the expected and found shapes and the fix, a
checkpoint of another architecture, a tensor the model would not use.
"""

import dataclasses
import difflib
import json
import pathlib
import re
import struct
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import traverse_util

from effjax.models import vit

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
HF_DEFAULT_NORM_EPS = 1e-12  # transformers' ViTConfig / DeiTConfig layer_norm_eps


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


# --- reading and writing tensors ---------------------------------------------------------------------------------


def read_safetensors(path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``.safetensors`` file, each in its stored dtype (bfloat16 as ``ml_dtypes``)."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({len(data)} bytes, shorter than its header).")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{path}: not a safetensors file (header length {size} exceeds the file's "
                              f"{len(data)} bytes); is it truncated or a PyTorch file?")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e}).") from None
    buffer = memoryview(data)[8 + size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which this reader "
                                  f"does not know ({', '.join(SAFETENSORS_DTYPES)}).")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(buffer) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data offsets "
                                  f"[{begin}, {end}] that do not fit its size or the file; the file is damaged.")
        tensors[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
    return tensors


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Writes ``{name: array}`` (numpy or jax, any dtype of ``SAFETENSORS_DTYPES``) as a ``.safetensors`` file."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in codes:
            raise CheckpointError(f"write_safetensors: tensor {name!r} has dtype {array.dtype}, which safetensors "
                                  "cannot hold.")
        raw = array.astype(dtype, copy=False).tobytes(order="C")
        header[name] = {"dtype": codes[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for chunk in chunks:
            f.write(chunk)


def read_torch(path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a PyTorch state dict file (``torch.load`` with ``weights_only=True``); needs torch."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: a PyTorch file needs torch, which is not installed: install torch, or convert the file "
            "once where torch is (safetensors.torch.save_file(torch.load(path, map_location='cpu'), "
            "'model.safetensors')) and load the .safetensors file.") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):  # training checkpoints (DeiT's own) wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoint_file(path) -> pathlib.Path:
    """The weights file of ``path``: the file itself, or a directory's (snapshot's) ``model.safetensors``,
    ``model.safetensors.index.json`` or ``pytorch_model.bin``."""
    path = pathlib.Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a directory without model.safetensors, model.safetensors.index.json or "
                              "pytorch_model.bin; pass the weights file itself.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (nothing is downloaded: pass a local checkpoint).")
    return path


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a checkpoint file or snapshot directory, in the stored dtypes."""
    path = checkpoint_file(path)
    if path.name.endswith(".safetensors.index.json"):
        weight_map = json.loads(path.read_text()).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(path.parent / shard))
        return tensors
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or a PyTorch "
                          f"file ({', '.join(TORCH_SUFFIXES)}).")


def hf_config(path) -> dict:
    """The ``config.json`` beside a Hugging Face weights file (or in its snapshot directory), or {}."""
    path = pathlib.Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config}: not valid JSON ({e}).") from None


# --- the mapping -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One checkpoint tensor ``key`` of ``shape`` and what it becomes: ``convert(array) -> {param path: array}``."""

    key: str
    shape: tuple
    convert: Callable
    kind: str = ""  # 'patch', 'pos', 'head', 'mlp': which fix a wrong shape suggests (``fix_hint``)
    missing: str = ""  # what a missing tensor means, when more than "another architecture"


def to(path: str, fn=lambda a: a):
    return lambda a: {path: fn(a)}


def linear(path: str):
    """A torch Linear (``weight [out, in]``) -> a flax Dense kernel ``[in, out]``."""
    return to(path, lambda a: a.T)


def layer_norm(key: str, path: str, d: int) -> list[Entry]:
    return [Entry(f"{key}.weight", (d,), to(f"{path}/layer_norm/scale")),
            Entry(f"{key}.bias", (d,), to(f"{path}/layer_norm/bias"))]


def mlp(fc1: str, fc2: str, path: str, d: int, m: int) -> list[Entry]:
    """The block MLP's two Linear layers ``fc1`` [m, d] and ``fc2`` [d, m] into ``path/mlp/wi`` and ``wo``."""
    return [Entry(f"{fc1}.weight", (m, d), linear(f"{path}/mlp/wi/kernel"), "mlp"),
            Entry(f"{fc1}.bias", (m,), to(f"{path}/mlp/wi/bias"), "mlp"),
            Entry(f"{fc2}.weight", (d, m), linear(f"{path}/mlp/wo/kernel"), "mlp"),
            Entry(f"{fc2}.bias", (d,), to(f"{path}/mlp/wo/bias"))]


def token(d: int, name: str):
    return to(name, lambda a: a.reshape(1, d))


def fused_qkv(block: str, heads: int, head_dim: int, bias: bool):
    """timm's fused ``qkv`` [3 D, D] (out = (q|k|v, head, head_dim)) -> query/key/value [D, heads, head_dim]."""

    def convert(a):
        if bias:
            parts = a.reshape(3, heads, head_dim)
            return {f"{block}/attention/{n}_bias": parts[i] for i, n in enumerate(("query", "key", "value"))}
        parts = a.reshape(3, heads, head_dim, -1)
        return {f"{block}/attention/{n}": parts[i].transpose(2, 0, 1) for i, n in enumerate(("query", "key", "value"))}

    return convert


def projection(path: str, heads: int, head_dim: int):
    """A torch Linear [D, D] producing one of q, k, v -> [D, heads, head_dim]."""
    return to(path, lambda a: a.T.reshape(-1, heads, head_dim))


def out_projection(path: str, heads: int, head_dim: int):
    """The attention output Linear [D, D] (input = (head, head_dim)) -> [heads, head_dim, D]."""
    return to(path, lambda a: a.T.reshape(heads, head_dim, -1))


def widths(d: int) -> str:
    names = [n for n in vit.VARIANTS if vit.VARIANTS[n]["embed_dim"] == d]
    return f" ({', '.join(names)})" if names else ""


def stem_entries(model, keys: dict, name: str) -> list[Entry]:
    """The patch embedding, class/distillation tokens and position embedding, under ``keys``' names."""
    d, c, p = model.embed_dim, model.channels, model.patch_size
    n = model.num_patches() + model.prefix_tokens
    entries = [
        Entry(keys["patch_weight"], (d, c, p, p), to("patch_embed/kernel", lambda a: a.transpose(2, 3, 1, 0)),
              "patch"),
        Entry(keys["patch_bias"], (d,), to("patch_embed/bias")),
        Entry(keys["cls"], (1, 1, d), token(d, "cls_token")),
    ]
    if model.distilled:
        entries.append(Entry(keys["dist"], (1, 1, d), token(d, "dist_token"),
                             missing=f"the checkpoint is not a distilled DeiT, but {name} is: use a name without "
                             "'distilled' (or distilled=False)"))
    entries.append(Entry(keys["pos"], (1, n, d), to("pos_embed", lambda a: a.reshape(n, d)), "pos"))
    return entries


def head_entries(model, heads: list[tuple[str, str]]) -> list[Entry]:
    """``heads``: (checkpoint name, param name) of the classifier(s); none when ``num_classes`` is 0."""
    if not model.num_classes:
        return []
    k, d = model.num_classes, model.embed_dim
    missing = "a checkpoint without this classifier: pass num_classes=0 to get the features"
    entries = []
    for key, path in heads:
        entries += [Entry(f"{key}.weight", (k, d), linear(f"{path}/kernel"), "head", missing),
                    Entry(f"{key}.bias", (k,), to(f"{path}/bias"), "head", missing)]
    return entries


def timm_entries(model, name: str) -> list[Entry]:
    d, m, h = model.embed_dim, model.mlp_dim, model.num_heads
    hd = d // h
    entries = stem_entries(model, dict(patch_weight="patch_embed.proj.weight", patch_bias="patch_embed.proj.bias",
                                       cls="cls_token", dist="dist_token", pos="pos_embed"), name)
    for i in range(model.num_layers):
        src, dst = f"blocks.{i}", f"block_{i}"
        entries += layer_norm(f"{src}.norm1", f"{dst}/ln_attention", d)
        entries += [Entry(f"{src}.attn.qkv.weight", (3 * d, d), fused_qkv(dst, h, hd, bias=False)),
                    Entry(f"{src}.attn.qkv.bias", (3 * d,), fused_qkv(dst, h, hd, bias=True)),
                    Entry(f"{src}.attn.proj.weight", (d, d), out_projection(f"{dst}/attention/out", h, hd)),
                    Entry(f"{src}.attn.proj.bias", (d,), to(f"{dst}/attention/out_bias"))]
        entries += layer_norm(f"{src}.norm2", f"{dst}/ln_mlp", d)
        entries += mlp(f"{src}.mlp.fc1", f"{src}.mlp.fc2", dst, d, m)
    entries += layer_norm("norm", "ln_final", d)
    return entries + head_entries(model, [("head", "head")] + [("head_dist", "head_dist")] * model.distilled)


# Hugging Face block names: the hub's (save_pretrained) and transformers 5's in-memory state_dict names.
HF_BLOCK_NAMES = {
    "hub": dict(layer="encoder.layer", q="attention.attention.query", k="attention.attention.key",
                v="attention.attention.value", o="attention.output.dense", fc1="intermediate.dense",
                fc2="output.dense"),
    "v5": dict(layer="layers", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
               o="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2"),
}
HF_HEADS = ("classifier", "cls_classifier", "distillation_classifier")
HF_IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token")  # unused by classification


def hf_entries(model, name: str, prefix: str, style: str) -> list[Entry]:
    d, m, h = model.embed_dim, model.mlp_dim, model.num_heads
    hd = d // h
    emb = f"{prefix}embeddings"
    entries = stem_entries(model, dict(patch_weight=f"{emb}.patch_embeddings.projection.weight",
                                       patch_bias=f"{emb}.patch_embeddings.projection.bias",
                                       cls=f"{emb}.cls_token", dist=f"{emb}.distillation_token",
                                       pos=f"{emb}.position_embeddings"), name)
    names = HF_BLOCK_NAMES[style]
    for i in range(model.num_layers):
        src, dst = f"{prefix}{names['layer']}.{i}", f"block_{i}"
        entries += layer_norm(f"{src}.layernorm_before", f"{dst}/ln_attention", d)
        for qkv in ("q", "k", "v"):
            param = {"q": "query", "k": "key", "v": "value"}[qkv]
            entries += [Entry(f"{src}.{names[qkv]}.weight", (d, d), projection(f"{dst}/attention/{param}", h, hd)),
                        Entry(f"{src}.{names[qkv]}.bias", (d,),
                              to(f"{dst}/attention/{param}_bias", lambda a: a.reshape(h, hd)))]
        entries += [Entry(f"{src}.{names['o']}.weight", (d, d), out_projection(f"{dst}/attention/out", h, hd)),
                    Entry(f"{src}.{names['o']}.bias", (d,), to(f"{dst}/attention/out_bias"))]
        entries += layer_norm(f"{src}.layernorm_after", f"{dst}/ln_mlp", d)
        entries += mlp(f"{src}.{names['fc1']}", f"{src}.{names['fc2']}", dst, d, m)
    entries += layer_norm(f"{prefix}layernorm", "ln_final", d)
    heads = [("cls_classifier", "head"), ("distillation_classifier", "head_dist")] if model.distilled else \
        [("classifier", "head")]
    return entries + head_entries(model, heads)


# --- format detection and errors ---------------------------------------------------------------------------------


def detect(tensors: dict, path) -> tuple[str, str, str]:
    """``(format, prefix, style)``: ('timm', '', '') or ('hf', 'vit.' | 'deit.' | '', 'hub' | 'v5')."""
    if "patch_embed.proj.weight" in tensors:
        return "timm", "", ""
    for prefix in ("vit.", "deit.", ""):
        if f"{prefix}embeddings.patch_embeddings.projection.weight" in tensors:
            style = "v5" if any(k.startswith(f"{prefix}layers.") for k in tensors) else "hub"
            return "hf", prefix, style
    first = ", ".join(list(tensors)[:4])
    guess = ""
    if any(k.startswith(("layer1.", "conv1.", "stem.", "stages.")) for k in tensors):
        guess = " (its names are a CNN's, e.g. a ResNet's)"
    elif any(".layer." in k or k.startswith(("bert.", "transformer.", "model.")) for k in tensors):
        guess = " (its names are another transformer's)"
    raise CheckpointError(
        f"{path}: not a ViT/DeiT checkpoint{guess}: it has neither timm's patch_embed.proj.weight nor Hugging "
        f"Face's vit.embeddings.patch_embeddings.projection.weight; its {len(tensors)} tensors start with {first}.")


def block_count(tensors: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def fix_hint(entry: Entry, found: tuple, model, name: str) -> str:
    """What to change when tensor ``entry`` has shape ``found`` instead of ``entry.shape``."""
    d = model.embed_dim
    if entry.kind == "head" and found[0] != model.num_classes:
        return f"the checkpoint has {found[0]} classes: pass num_classes={found[0]} (or 0 for features)"
    if entry.kind == "patch" and len(found) == 4:
        if found[0] != d:
            return (f"the checkpoint is {found[0]} wide: pass the name it was saved from{widths(found[0])}, or "
                    f"embed_dim={found[0]} with its depth and num_heads")
        if found[2:] != entry.shape[2:]:
            return f"the checkpoint has {found[2]}x{found[3]} patches: pass patch_size={found[2]}"
        return f"the checkpoint takes {found[1]} channels: pass in_chans={found[1]}"
    if entry.kind == "pos" and len(found) == 3 and found[2] == d:
        patches = found[1] - model.prefix_tokens
        side = int(round(patches ** 0.5))
        size = (f"; a {side}x{side} grid is img_size={side * model.patch_size}" if side * side == patches else "")
        height, width = vit.image_size_of(model.image_size)
        return (f"its position embedding covers {patches} patches (+{model.prefix_tokens} prefix), {name} at "
                f"{height}x{width} with patch_size {model.patch_size} has {model.num_patches()}: pass the "
                f"checkpoint's img_size/patch_size{size} (no resampling is done)")
    mlp = next((dim for dim in found if dim != d), None)
    if entry.kind == "mlp" and mlp is not None:
        return f"its MLP is {mlp} wide: pass mlp_ratio={mlp / d:g}"
    return "the checkpoint is of another shape: pass the name and overrides it was saved with"


def check_distilled(tensors: dict, fmt: str, prefix: str, model, name: str, path) -> None:
    dist_key = "dist_token" if fmt == "timm" else f"{prefix}embeddings.distillation_token"
    if dist_key in tensors and not model.distilled:
        raise CheckpointError(f"{path} is a distilled DeiT (it has {dist_key}) but {name} is not distilled: use a "
                              "deit_*_distilled_* name (or distilled=True).")
    if (fmt == "hf" and dist_key in tensors and model.num_classes and "cls_classifier.weight" not in tensors
            and "classifier.weight" in tensors):
        raise CheckpointError(f"{path} is a DeiTForImageClassification (one classifier on the CLS token), which "
                              "this family does not build: use a DeiTForImageClassificationWithTeacher checkpoint "
                              "(cls_classifier and distillation_classifier).")


def check_entry(tensors: dict, entry: Entry, model, name: str, path) -> None:
    """One-line error when ``entry``'s tensor is missing or mis-shaped."""
    if entry.key not in tensors:
        close = difflib.get_close_matches(entry.key, list(tensors), n=1, cutoff=0.8)
        hint = entry.missing or (f"the checkpoint is of another architecture (closest in the file: {close[0]!r})"
                                 if close else "the checkpoint is of another architecture")
        raise CheckpointError(f"{path}: missing tensor {entry.key!r} (shape {list(entry.shape)}) for {name}: "
                              f"{hint}.")
    found = tuple(tensors[entry.key].shape)
    if found != entry.shape:
        raise CheckpointError(f"{path}: tensor {entry.key!r} has shape {list(found)}, {name} expects "
                              f"{list(entry.shape)}: {fix_hint(entry, found, model, name)}.")


def map_tensors(tensors: dict, entries: list[Entry], model, name: str, path, ignored=()) -> dict:
    """Params ``{path: float32 array}`` from ``tensors`` through ``entries``; one-line errors otherwise."""
    params, used = {}, set(ignored)
    for entry in entries:
        check_entry(tensors, entry, model, name, path)
        used.add(entry.key)
        params.update(entry.convert(np.asarray(tensors[entry.key], np.float32)))
    unused = [k for k in tensors if k not in used]
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise CheckpointError(f"{path}: tensor {unused[0]!r}{more} would not be used by {name}: the checkpoint is of "
                              "another architecture (fc_norm: global_pool='avg'; ls1/ls2: LayerScale; reg_token: "
                              "registers; none are supported).")
    return params


def check_depth(tensors: dict, pattern: str, model, name: str, path) -> None:
    blocks = block_count(tensors, pattern)
    if blocks and blocks != model.num_layers:
        raise CheckpointError(f"{path}: the checkpoint has {blocks} blocks but {name} has depth {model.num_layers}: "
                              f"pass the name it was saved from, or depth={blocks}.")


def check_hf_config(config: dict, model, name: str, path) -> None:
    heads = config.get("num_attention_heads")
    if heads is not None and heads != model.num_heads:
        raise CheckpointError(f"{path}: its config.json has num_attention_heads={heads} but {name} has num_heads="
                              f"{model.num_heads}: pass num_heads={heads}.")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: its config.json has hidden_act={act!r}; this family runs the erf GELU "
                              "('gelu') only.")


# --- entry point -------------------------------------------------------------------------------------------------


def from_timm(path, name: str, **overrides):
    """``(model, variables)`` for the timm or Hugging Face ViT/DeiT checkpoint ``path`` saved from timm model
    ``name`` (a ``vit.VARIANTS`` name) with timm-style ``overrides`` (``img_size``, ``num_classes``...).

    ``model.apply(variables, images)`` gives the checkpoint's eval logits for normalised images
    ``[batch, H, W, 3]``. Every parameter is float32 whatever the file's dtype. A Hugging Face checkpoint sets
    ``norm_eps`` from its ``config.json`` (1e-12 without one) unless ``overrides`` set it. With
    ``num_classes=0`` the heads are dropped and the model returns the CLS features.
    """
    tensors = read_checkpoint(path)
    fmt, prefix, style = detect(tensors, path)
    vit.check_name(name)
    config = hf_config(path) if fmt == "hf" else {}
    if fmt == "hf":
        overrides.setdefault("norm_eps", float(config.get("layer_norm_eps", HF_DEFAULT_NORM_EPS)))
    model = vit.variant(name, **overrides)
    check_distilled(tensors, fmt, prefix, model, name, path)
    if fmt == "timm":
        entries, blocks = timm_entries(model, name), r"blocks\.(\d+)\."
        ignored = () if model.num_classes else tuple(k for k in tensors if k.startswith(("head.", "head_dist.")))
    else:
        check_hf_config(config, model, name, path)
        entries = hf_entries(model, name, prefix, style)
        blocks = rf"{re.escape(prefix)}(?:encoder\.layer|layers)\.(\d+)\."
        ignored = tuple(prefix + k for k in HF_IGNORED)
        if not model.num_classes:
            ignored += tuple(k for k in tensors if k.split(".")[0] in HF_HEADS)
    check_entry(tensors, entries[0], model, name, path)  # the patch embedding: the width before the depth
    check_depth(tensors, blocks, model, name, path)
    flat = map_tensors(tensors, entries, model, name, path, ignored)
    height, width = vit.image_size_of(model.image_size)
    images = jax.ShapeDtypeStruct((1, height, width, model.channels), np.float32)
    abstract = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images))
    expected = {"/".join(k): v for k, v in traverse_util.flatten_dict(abstract["params"]).items()}
    if set(expected) != set(flat):
        raise AssertionError(f"convert: params {sorted(set(expected) ^ set(flat))[:3]} mapped or left unmapped.")
    for key, array in flat.items():
        if tuple(array.shape) != tuple(expected[key].shape):
            raise AssertionError(f"convert: {key} converted to {array.shape}, the model has {expected[key].shape}.")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(v) for k, v in flat.items()})
    return model, {"params": params}
