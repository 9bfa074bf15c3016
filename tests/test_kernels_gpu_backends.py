"""The GPU attention backends (``kernels/gpu_cudnn.py``, ``gpu_mosaic.py``, ``gpu_tokamax.py``) without a GPU:
their ``supports`` reasons on a CPU, the mapping of effjax's patterns onto jax.nn's arguments (run through
``jax.nn.dot_product_attention(implementation="xla")`` against ``effjax.attention.softmax.attend``), and
lowering for CUDA from this CPU where jax allows it. The ``gpu``-marked tests run each backend against the
reference on a GPU (``benchmarks/gpu_check.sh``) and skip here.
"""

import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_after
from kernel_checks import _target_gpu as target_gpu
from kernel_checks import assert_close, inputs, jit, value_and_grads

from effjax.attention import sliding_window, softmax
from effjax.kernels import gpu_cudnn, gpu_mosaic, gpu_tokamax

BACKENDS = (gpu_cudnn, gpu_mosaic, gpu_tokamax)
ON_GPU = jax.default_backend() == "gpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F16 = jnp.float16


def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def call_of(lq=256, lk=None, heads=4, kv_heads=4, d=64, dtype=jnp.bfloat16, **kwargs):
    lk = lk or lq
    return dict(q=sds((2, lq, heads, d), dtype), k=sds((2, lk, kv_heads, d), dtype), v=sds((2, lk, kv_heads, d), dtype),
                **kwargs)


def f16(**kwargs):
    return call_of(dtype=F16, **kwargs)


def suffix_mask(lk, lengths=(None, 7)):
    """Row 0 keeps every key, row 1 drops its last 7 (a right-padded suffix: cuDNN's key-value lengths)."""
    return np.stack([np.arange(lk) < lk - (n or 0) for n in lengths])


def holes_mask(lk):
    mask = np.ones((2, lk), bool)
    mask[0, 3:9] = False  # a hole in the middle: not a suffix
    mask[1, -5:] = False
    return mask


def segments(length):
    row0 = np.concatenate([np.full(5, 1), np.full(11, 2), np.full(length - 16, 3)])
    return np.stack([row0, np.ones(length, int)]).astype(np.int32)


class FakeGpu:
    """A stand-in device for the GPU-side checks of ``supports``."""

    def __init__(self, capability, version="cuda 13000"):
        self.compute_capability = capability
        self.client = types.SimpleNamespace(platform_version=version)


def check_stand_in_gpus(monkeypatch):
    """The GPU-side reasons (capability, head_dim limits, mask size) on stand-in devices."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    hopper = [FakeGpu("9.0")]
    monkeypatch.setattr(jax, "devices", lambda *a: hopper)
    assert gpu_cudnn.supports("attention", call_of(d=256, causal=True, mask=suffix_mask(256))) is None
    assert gpu_cudnn.supports("attention", call_of(d=264)) == "head_dim 264 is over 256 (Hopper)"
    assert gpu_mosaic.supports("attention", f16(kv_heads=1)) is None
    assert gpu_mosaic.supports("attention", f16(causal=True, grad=False)) is None
    big = call_of(lq=32768, segment_ids=jax.ShapeDtypeStruct((2, 32768), jnp.int32))
    assert gpu_cudnn.supports("attention", big) == (
        "segment_ids would need a dense [2, 1, 32768, 32768] mask (6.0 GiB, over 2 GiB)")
    assert gpu_cudnn.supports("attention", call_of(lq=255, lk=255, window=4)).startswith("odd lengths (255, 255)")
    hopper[0] = FakeGpu("8.0")
    assert gpu_cudnn.supports("attention", call_of(d=192)) == "head_dim 192 is over 128 (before Hopper)"
    assert gpu_mosaic.supports("attention", f16()) == \
        "needs compute capability 9.0 (Hopper: wgmma); this GPU has 8.0"
    hopper[0] = FakeGpu("7.5")
    assert gpu_cudnn.supports("attention", call_of()) == \
        "needs compute capability 8.0 (Ampere) or newer; this GPU has 7.5"
    hopper[0] = FakeGpu(None, "rocm 6.2")
    assert gpu_cudnn.supports("attention", call_of()) == "needs CUDA (the GPU platform is ROCm)"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the reasons given on a CPU")
def test_supports_reasons_on_cpu_and_stand_in_gpus(monkeypatch):
    for backend in BACKENDS:
        assert backend.PLATFORMS == ("gpu",) and set(backend.OPS) == {"attention"}
        assert backend.supports("scan", call_of()) == "no scan kernel"
        for bad in ({}, {"q": 1, "k": 2, "v": 3}, call_of(d=48, dropout_rate=object()), {"q": None}):
            assert isinstance(backend.supports("attention", bad), str), (backend.NAME, bad)
    assert [b.NAME for b in BACKENDS] == ["cudnn", "mosaic_gpu", "tokamax"]
    cpu = f"needs a GPU (platform is {jax.default_backend()})"
    cudnn = {
        "plain": (call_of(), cpu),
        "float32": (call_of(dtype=jnp.float32), "float32 (cuDNN takes bf16/fp16)"),
        "head_dim": (call_of(d=44), "head_dim 44 is not a multiple of 8"),
        "dropout": (call_of(dropout_rate=0.1), "dropout (jax.nn.dot_product_attention has no attention dropout)"),
        "interpret": (call_of(interpret=True), "interpret mode (cuDNN runs compiled only)"),
        "segments_gqa_causal_window": (call_of(kv_heads=1, causal=True, window=16, segment_ids=segments(256),
                                               mask=suffix_mask(256)), cpu),
    }
    mosaic = {  # float16: attention_mgpu's dtype
        "plain": (f16(), cpu),
        "bfloat16": (call_of(), f"bfloat16 (attention_mgpu in jax {jax.__version__} keeps its tiles in float16; "
                     "pass float16)"),
        "float32": (call_of(dtype=jnp.float32), "float32 (attention_mgpu takes fp16)"),
        "head_dim": (f16(d=32), "head_dim 32 is not a multiple of 64"),
        "mask": (f16(mask=suffix_mask(256)), "key padding (attention_mgpu takes none)"),
        "all_true_mask": (f16(mask=np.ones((2, 256), bool)), cpu),
        "segments": (f16(segment_ids=segments(256)), "segment ids (attention_mgpu takes none)"),
        "window": (f16(window=8), "window (attention_mgpu takes none)"),
        "causal": (f16(causal=True), "causal backward (attention_mgpu differentiates bidirectional attention only; "
                   "pass grad=False for a forward-only call)"),
        "causal_forward": (f16(causal=True, grad=False), cpu),
        "causal_cross": (f16(lq=128, lk=256, causal=True, grad=False),
                         "causal cross attention (attention_mgpu aligns causal to the start)"),
        "q_len": (f16(lq=192), "q_len 192 is not a multiple of 128"),
        "dropout": (f16(dropout_rate=0.1), "dropout (attention_mgpu has no attention dropout)"),
    }
    for backend, cases in ((gpu_cudnn, cudnn), (gpu_mosaic, mosaic)):
        for name, (call, want) in cases.items():
            assert backend.supports("attention", call) == want, (backend.NAME, name)
    # Real arrays as well as ShapeDtypeStructs.
    q, k, v, _ = inputs(0, 16, d=16, dtype=jnp.bfloat16)
    assert gpu_cudnn.supports("attention", dict(q=q, k=k, v=v, mask=holes_mask(16))) == cpu
    if gpu_tokamax.module() is None:
        for call in (call_of(), call_of(dtype=jnp.float32, dropout_rate=0.5), {}):
            assert gpu_tokamax.supports("attention", call) == "tokamax is not installed"
        with pytest.raises(NotImplementedError, match="tokamax: tokamax is not installed"):
            gpu_tokamax.attention(q, k, v)
    else:
        assert gpu_tokamax.supports("attention", call_of()) == cpu
    with pytest.raises(NotImplementedError, match=re.escape(f"cudnn: cannot run this attention call: {cpu}.")):
        gpu_cudnn.attention(q, k, v)
    check_stand_in_gpus(monkeypatch)


def test_plan_routes_each_pattern_to_native_arguments_or_a_mask():
    plan = gpu_cudnn.plan
    p = plan(2, 64, 64, causal=True, window=5, mask=suffix_mask(64))
    assert (p.is_causal, p.local_window, p.dense) == (True, (5, 0), ())
    assert list(p.kv_lengths) == [64, 57] and p.kv_lengths.dtype == np.int32
    assert plan(2, 64, 64, window=5).dense == ("window",)  # cuDNN: no right window without causal
    assert plan(2, 64, 64, window=5, two_sided_window=True).local_window == (5, 5)
    cross = plan(2, 16, 64, causal=True, window=3)
    assert not cross.is_causal and cross.dense == ("causal cross attention", "window cross attention")
    assert cross.mask_batch == 1 and cross.dense_bytes(16, 64, 2, full_rows=False) == 16 * 64 * 3
    holes = plan(2, 64, 64, mask=holes_mask(64), segment_ids=segments(64))
    assert holes.kv_lengths is None and holes.dense == ("key padding", "segment_ids") and holes.mask_batch == 2
    empty = suffix_mask(64, lengths=(64, 0))  # row 0 has no key: effjax averages all values, cuDNN's lengths can't
    assert plan(2, 64, 64, mask=empty).dense == ("key padding",)
    padding_only = plan(2, 64, 64, mask=holes_mask(64))
    assert padding_only.dense_bytes(64, 64, 2, full_rows=False) == 2 * 64 * 3  # [batch, 1, 1, kv_len] for tokamax
    assert padding_only.dense_bytes(64, 64, 2, full_rows=True) == 2 * 64 * 64 * 3  # cuDNN's bias has q_len rows
    big = call_of(lq=32768, segment_ids=jax.ShapeDtypeStruct((2, 32768), jnp.int32))
    assert gpu_cudnn.plan(2, 32768, 32768, segment_ids=big["segment_ids"]).dense_bytes(32768, 32768, 2, True) > \
        gpu_cudnn.DENSE_MASK_LIMIT


def effjax_reference(q, k, v, *, mask=None, segment_ids=None, causal=False, window=None):
    """``softmax.attend`` (``sliding_window.attend`` with a window), kv heads repeated for GQA."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    if window is None:
        return softmax.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal)
    return sliding_window.attend(q, k, v, mask=mask, segment_ids=segment_ids, causal=causal, window=window)


def outputs_and_grads(fns, q, k, v, ct):
    """[(fn(q, k, v), d(sum(out * ct))/d(q, k, v)) for fn in fns], in one jitted computation (one compile)."""
    def run(q, k, v):
        results = []
        for fn in fns:
            out, pullback = jax.vjp(fn, q, k, v)
            results.append((out, pullback(ct.astype(out.dtype))))
        return results

    return jit(run)(q, k, v)


# (name, q_len, kv_len, heads, kv_heads, effjax kwargs, two-sided window, cuDNN plan's dense features)
MAPPING_CASES = [
    ("causal_suffix_padding_gqa", 32, 32, 4, 2, dict(causal=True, mask="suffix"), False, ()),
    ("padding_with_holes_segments", 32, 32, 2, 2, dict(mask="holes", segment_ids="seg"), False,
     ("key padding", "segment_ids")),
    ("causal_segments_mqa", 40, 40, 4, 1, dict(causal=True, segment_ids="seg"), False, ("segment_ids",)),
    ("causal_cross_attention_padding", 16, 40, 2, 2, dict(causal=True, mask="suffix"), False,
     ("causal cross attention",)),
    ("causal_window", 40, 40, 2, 2, dict(causal=True, window=5), False, ()),
    ("bidirectional_window_as_mask", 40, 40, 2, 2, dict(window=5, mask="suffix"), False, ("window",)),
    ("bidirectional_window_two_sided", 40, 40, 2, 2, dict(window=5, mask="suffix"), True, ()),
    ("window_cross_attention", 24, 40, 2, 2, dict(window=6), True, ("window cross attention",)),
    ("row_without_keys", 24, 24, 2, 2, dict(mask="empty"), False, ("key padding",)),
]


def resolve(kwargs, lq, lk):
    out = dict(kwargs)
    masks = {"suffix": lambda: suffix_mask(lk), "holes": lambda: holes_mask(lk),
             "empty": lambda: suffix_mask(lk, lengths=(None, lk))}
    if "mask" in out:
        out["mask"] = masks[out["mask"]]()
    if out.get("segment_ids") == "seg":
        out["segment_ids"] = segments(lq)
    return out


@pytest.mark.parametrize("case", slow_after(MAPPING_CASES, keep=1, unpack=False), ids=[c[0] for c in MAPPING_CASES])
def test_mapped_arguments_through_jax_nn_xla_match_softmax_attend(case):
    # jax.nn.dot_product_attention's XLA path given the arguments the cuDNN backend would pass: the same function
    # as effjax's softmax (outputs and gradients), so the mapping is right whichever implementation runs it.
    _, lq, lk, heads, kv_heads, kwargs, two_sided, dense = case
    q, k, v, ct = inputs(1, lq, lk, heads, kv_heads)
    kwargs = resolve(kwargs, lq, lk)
    p = gpu_cudnn.plan(2, lq, lk, two_sided_window=two_sided, **kwargs)
    assert p.dense == dense

    def mapped(q, k, v):
        args = gpu_cudnn.nn_arguments(lq, lk, p, full_rows=not two_sided, **kwargs)
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)

    with jax.default_matmul_precision("highest"):  # float32 dots on a GPU too (no TF32): 1e-5 tolerances
        (out, grads), (ref_out, ref_grads) = outputs_and_grads(
            (mapped, lambda q, k, v: effjax_reference(q, k, v, **kwargs)), q, k, v, ct)
    assert_close(out, ref_out, 1e-5, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, 2e-5)


@pytest.mark.slow
def test_a_traced_mask_takes_the_dense_path_and_stays_exact():
    q, k, v, _ = inputs(2, 32)
    mask = suffix_mask(32)

    def mapped(q, k, v, mask):
        p = gpu_cudnn.plan(2, 32, 32, mask=mask, causal=True)
        assert p.dense == ("key padding",) and p.kv_lengths is None  # a tracer: no lengths can be read off it
        args = gpu_cudnn.nn_arguments(32, 32, p, mask=mask, causal=True, full_rows=True)
        assert args["mask"].shape == (2, 1, 32, 32)
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **args)

    with jax.default_matmul_precision("highest"):
        out = jax.jit(mapped)(q, k, v, mask)
        assert_close(out, softmax.attend(q, k, v, mask=mask, causal=True), 1e-5, 1e-5)


@pytest.mark.slow
def test_tokamax_mapping_through_its_xla_implementation(monkeypatch):
    pytest.importorskip("tokamax")
    # supports traces the call through tokamax: its kernels' refusals come back one line per implementation.
    monkeypatch.setattr(gpu_tokamax, "gpu_reason", lambda *a, **k: None)
    call = call_of(lq=64, kv_heads=2, causal=True, window=8, mask=holes_mask(64))
    assert gpu_tokamax.supports("attention", call) == "mosaic: Not supported on cpu.; triton: Not supported on cpu."
    monkeypatch.setattr(gpu_tokamax, "IMPLEMENTATIONS", ("xla",))
    assert gpu_tokamax.supports("attention", call) is None
    for _, lq, lk, heads, kv_heads, kwargs, _, _ in MAPPING_CASES:
        q, k, v, _ = inputs(3, lq, lk, heads, kv_heads)
        kwargs = resolve(kwargs, lq, lk)
        out = jit(lambda q, k, v, kw=kwargs: gpu_tokamax.attention(q, k, v, implementation="xla", **kw))(q, k, v)
        assert_close(out, effjax_reference(q, k, v, **kwargs), 1e-5, 1e-5)


# ----------------------------------------------------------------------------------------------------
# Lowering for CUDA from this CPU (jax.export, platforms=["cuda"]): nothing runs, no GPU needed.


@pytest.mark.slow
def test_cudnn_lowers_for_cuda_from_cpu(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as fused

    # No GPU here: skip the backend's device check, and give jax's cuDNN wrapper a version to read (it asks the
    # CUDA plugin, absent on a CPU machine). Hopper's head_dim limit needs a device to read, so d = 128.
    monkeypatch.setattr(gpu_cudnn, "gpu_reason", lambda *a, **k: None)
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    q, k = sds((2, 256, 4, 128)), sds((2, 256, 2, 128))
    mask = jax.ShapeDtypeStruct((2, 256), jnp.bool_)

    def grads(q, k, v, mask):
        def loss(q, k, v):
            return gpu_cudnn.attention(q, k, v, causal=True, window=64, mask=mask).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    targets = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")  # with a bias: the mask
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
    text = jax.export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=checks)(q, k, k, mask).mlir_module()
    for target in targets:
        assert text.count(f"custom_call @{target}(") == 1, target
    # Causal as cuDNN's own mask type, the window as its left sliding window (window + 1, exclusive), the traced key
    # mask as a [batch, 1, q, k] bias.
    assert text.count("\\22mask_type\\22: \\22CAUSAL\\22") == 2
    assert text.count("\\22sliding_window_length\\22: 65") == 2
    assert "tensor<2x1x256x256xbf16>" in text


@pytest.mark.slow
def test_mosaic_gpu_lowers_for_cuda_from_cpu(monkeypatch):
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    # An abstract H100 to lower for (kernel_checks), no device check, and a CUDA runtime version for the kernel's
    # causal guard (it asks the CUDA plugin, absent here).
    monkeypatch.setattr(gpu_mosaic, "gpu_reason", lambda *a, **k: None)
    monkeypatch.setattr(attention_mgpu, "cuda_versions", types.SimpleNamespace(cuda_runtime_get_version=lambda: 13000))
    q, k = sds((2, 256, 4, 128), F16), sds((2, 256, 2, 128), F16)

    def fwd_and_grads(q, k, v):
        causal = gpu_mosaic.attention(q, k, v, causal=True, grad=False)
        loss = lambda q, k, v: gpu_mosaic.attention(q, k, v).astype(jnp.float32).sum()  # noqa: E731
        return causal, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    check = [jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")]
    export = jax.export.export
    with target_gpu():
        text = export(jax.jit(fwd_and_grads), platforms=["cuda"], disabled_checks=check)(q, k, k).mlir_module()
    assert text.count("custom_call @mosaic_gpu_v2(") == 4  # causal forward, forward, dQ, dK/dV
    kernel = lambda q, k, v: attention_mgpu.attention(q, k, v, gpu_mosaic.tuning(256, 128, False))  # noqa: E731
    with target_gpu(), pytest.raises(ValueError, match="Expected dtypes to match but src had type bfloat16"):
        export(jax.jit(kernel), platforms=["cuda"], disabled_checks=check)(sds(q.shape), sds(k.shape), sds(k.shape))


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    # benchmarks/gpu_check.sh --dry-run: every step of the GPU check on this CPU (interpreted kernels, tiny sizes),
    # into one folder the device tool can bring back (at most 8 files), with the benchmark's time guard tripping.
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ""}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names == ["gpu_check.log", "kernels.jsonl", "kernels.md", "kernels.png", "kernels_auto_table.json",
                     "summary.md", "token_reduction.json", "token_reduction.png"]
    summary = (out / "summary.md").read_text()
    for step in ("tests: GPU tests: ok", "kernel_speed.py: ok", "token_reduction.py (ToMe speed): ok"):
        assert step in summary, summary
    rows = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    first = {(r["impl"], r["causal"], r["pass"]): r["status"] for r in rows if r["length"] == 32}
    assert first[("cudnn", True, "fwd")] == "refused: float32 (cuDNN takes bf16/fp16)"
    assert first[("tokamax", False, "fwd+bwd")].startswith("refused: ")
    assert first[("flash", True, "fwd+bwd")] == "ok"
    assert {r["status"] for r in rows if r["length"] == 64} == {"skipped: time budget (0.5 s) spent"}
    assert "| `flash` | 16 | 32 | yes | fwd+bwd |" in (out / "kernels.md").read_text()


# ----------------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh): each backend against the float32 reference, outputs and gradients.

# (name, kv_heads, effjax kwargs)
GPU_CASES = [
    ("bidirectional", 4, {}),
    ("causal", 4, dict(causal=True)),
    ("suffix_padding_gqa", 2, dict(mask="suffix")),
    ("holes_padding_segments_causal", 4, dict(mask="holes", segment_ids="seg", causal=True)),
    ("causal_window_mqa", 1, dict(causal=True, window=100)),
    ("bidirectional_window", 4, dict(window=100)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("backend", BACKENDS, ids=[b.NAME for b in BACKENDS])
def test_backend_on_gpu_matches_reference(backend, case, head_dim):
    from effjax.kernels.flash_attention import reference

    _, kv_heads, kwargs = case
    dtype = F16 if backend is gpu_mosaic else jnp.bfloat16  # attention_mgpu lowers float16 only
    q, k, v, ct = inputs(10, 256, heads=4, kv_heads=kv_heads, d=head_dim, dtype=dtype)
    kwargs = resolve(kwargs, 256, 256)
    reason = backend.supports("attention", dict(q=q, k=k, v=v, **kwargs))
    forward_only = reason is not None and backend.supports("attention", dict(q=q, k=k, v=v, grad=False, **kwargs)) \
        is None
    if reason and not forward_only:
        pytest.skip(f"{backend.NAME}: {reason}")
    extra = {"grad": False} if forward_only else {}
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if forward_only:  # Mosaic GPU's causal kernel: forward only
        out = jax.jit(lambda q, k, v: backend.attention(q, k, v, **kwargs, **extra))(q, k, v)
        assert_close(out, reference(*f32, **kwargs), 2e-2, 2e-2)
        return
    out, grads = value_and_grads(lambda q, k, v: backend.attention(q, k, v, **kwargs), q, k, v, ct)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, **kwargs), *f32, ct)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref_out, 2e-2, 2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert_close(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, 0, 2e-2)
