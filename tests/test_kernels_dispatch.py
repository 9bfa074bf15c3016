"""kernels/dispatch.py: impl specs, fallback in order with reasons, 'auto' per platform, the recorded choice."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.attention import softmax
from effjax.kernels import dispatch


def qkv(length=16, heads=2, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(key, (2, length, heads, head_dim), jnp.float32) for key in keys]


def test_specs_parse_names_lists_and_comma_strings_and_refuse_unknown_names_in_one_line():
    assert dispatch.parse("xla") == ("xla",)
    assert dispatch.parse("cudnn, triton,xla") == ("cudnn", "triton", "xla")
    assert dispatch.parse(["mosaic_tpu", "xla"]) == ("mosaic_tpu", "xla")
    for bad in ("cuda", "triton,cuda", "", ["xla", 3]):
        with pytest.raises(ValueError) as error:
            dispatch.parse(bad)
        message = str(error.value)
        assert "\n" not in message and "xla, pallas, auto, triton, mosaic_tpu" in message


def test_pallas_is_the_platforms_own_backend_and_auto_always_ends_in_xla():
    assert dispatch.expand("pallas", "attention", 128, "gpu") == ("triton",)
    assert dispatch.expand("pallas", "attention", 128, "tpu") == ("mosaic_tpu",)
    assert dispatch.expand("pallas", "attention", 128, "cpu") == ("triton",)
    assert dispatch.expand("auto", "attention", 4096, "cpu") == ("xla",)
    assert dispatch.expand("auto", "attention", 4096, "gpu") == ("xla",)  # nothing measured yet
    table = {"gpu": {"attention": [{"min_length": 0, "order": ["cudnn", "xla"]},
                                   {"min_length": 2048, "order": ["triton", "cudnn"]}]}}
    assert dispatch.auto_order("attention", 1024, "gpu", table) == ("cudnn", "xla")
    assert dispatch.auto_order("attention", 2048, "gpu", table) == ("triton", "cudnn", "xla")
    assert dispatch.auto_order("linear", 2048, "gpu", table) == ("xla",)
    assert dispatch.expand("triton,pallas,xla", "scan", 8, "gpu") == ("triton", "xla")  # no repeats


def test_a_backend_that_cannot_run_the_call_gives_its_reason_and_the_next_one_runs():
    q, k, v = qkv()
    out = softmax.attend(q, k, v, causal=True, impl="cudnn,mosaic_gpu,xla")
    np.testing.assert_allclose(out, softmax.attend(q, k, v, causal=True), atol=1e-6)
    choice = dispatch.choices()["softmax"]
    assert choice.backend == "xla" and [name for name, _ in choice.skipped] == ["cudnn", "mosaic_gpu"]
    assert all(reason for _, reason in choice.skipped)


def test_a_call_no_kernel_takes_falls_back_or_fails_in_one_line_naming_backend_reason_and_options():
    q, k, v = qkv()
    pair = np.tril(np.ones((16, 16), bool))[None, None]
    out = softmax.attend(q, k, v, pair_mask=pair, impl="pallas,xla")
    np.testing.assert_allclose(out, softmax.attend(q, k, v, pair_mask=pair), atol=1e-6)
    assert dispatch.choices()["softmax"].skipped[0][0] == "triton"
    with pytest.raises(dispatch.NoBackendError) as error:
        softmax.attend(q, k, v, pair_mask=pair, impl="pallas")
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, NotImplementedError)
    assert "\n" not in message and message.startswith("softmax: no backend in impl='pallas'")
    assert "triton: pair_mask" in message and "impl='pallas,xla'" in message and "auto" in message


def test_auto_on_a_cpu_runs_xla_and_the_choice_is_logged_once(caplog):
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            out = softmax.attend(q, k, v, impl="auto")
    np.testing.assert_array_equal(out, softmax.attend(q, k, v))
    assert dispatch.choices()["softmax"] == dispatch.Choice("attention", "xla", ())
    assert sum("softmax: attention runs on xla" in r.getMessage() for r in caplog.records) <= 1


def test_triton_runs_interpreted_on_a_cpu_and_refuses_what_its_kernels_cannot_take():
    q, k, v = qkv()
    out = softmax.attend(q, k, v, causal=True, impl="triton")
    np.testing.assert_allclose(out, softmax.attend(q, k, v, causal=True), atol=2e-5)
    assert dispatch.choices()["softmax"].backend == "triton"
    odd = jax.ShapeDtypeStruct((1, 16, 2, 12), jnp.float32)
    from effjax.kernels import triton_backend

    assert "head_dim must be a power of two" in triton_backend.supports("attention", dict(q=odd, k=odd, v=odd))
    call = dict(q=q, k=k, v=v, block_mask=np.ones((1, 1, 1), bool), block_size=24)
    assert triton_backend.supports("block_sparse", call) == "block_size must be a power of two, got 24"
    wide = jax.ShapeDtypeStruct((1, 16, 2, 300), jnp.float32)  # pads to 512 > 256: falls back instead of failing
    assert "feature dim 300 pads to 512" in triton_backend.supports("linear", dict(phi_q=wide, phi_k=wide, v=odd))


def test_the_block_table_is_written_atomically_keeps_other_entries_and_feeds_the_flash_kernel(tmp_path,
                                                                                             monkeypatch):
    from effjax.kernels import flash_attention, tuning

    table = str(tmp_path / "block_table.json")
    tuning.write({"block_q": 1}, "triton", "linear", "other device", table)
    blocks = {"block_q": 8, "block_k": 16, "block_q_bwd": 16, "block_k_bwd": 8}
    tuning.write(blocks, "triton", "attention", tuning.device_kind(), table)
    assert tuning.tuned("triton", "linear", "other device", table) == {"block_q": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_table.json"]  # no temp file left
    default = flash_attention.DEFAULT_BLOCKS["cpu"]
    assert tuning.flash_blocks(default) == default  # the shipped table (none) leaves the defaults
    monkeypatch.setattr(tuning, "TABLE_PATH", table)
    assert tuning.flash_blocks(default) == flash_attention.BlockSizes(8, 16, 16, 8)


@pytest.mark.slow
def test_autotune_times_block_sizes_and_writes_the_fastest(tmp_path):
    from effjax.kernels import tuning

    table = str(tmp_path / "block_table.json")
    tuning.main(["--small", f"--table={table}"])
    entry = tuning.tuned("triton", "attention", tuning.device_kind(), table)
    assert (entry["block_q"], entry["block_k"]) in ((16, 16), (32, 16)) and len(entry["seconds"]) == 2
    assert min(entry["seconds"].values()) > 0


def test_the_auto_table_is_built_from_measurements_fastest_first_and_cut_at_xla():
    def row(impl, length, seconds, head_dim=64, causal=False, status="ok"):
        return dict(impl=impl, length=length, head_dim=head_dim, causal=causal, status=status, seconds=seconds,
                    **{"pass": "fwd+bwd"})

    rows = [row("xla", 1024, 1.0), row("cudnn", 1024, 0.5), row("flash", 1024, 0.7), row("mosaic_gpu", 1024, 2.0),
            row("xla", 8192, 9.0), row("cudnn", 8192, 4.0), row("flash", 8192, 3.0),
            row("flash", 8192, 0.5, causal=True), row("cudnn", 8192, 1.0, causal=True),
            row("xla", 8192, 9.0, causal=True), row("tokamax", 8192, 0.1, status="refused: not installed"),
            row("linear_xla", 8192, 2.0), row("linear_chunked", 8192, 1.0), {**row("flash", 8192, 0.1), "pass": "fwd"}]
    table = dispatch.table_from_measurements(rows, "gpu")
    # 1K: cudnn then flash (mosaic_gpu is slower than XLA); 8K over both patterns: flash 3.5 s, cudnn 5 s
    assert table["gpu"]["attention"] == [{"min_length": 1024, "order": ["cudnn", "triton", "xla"]},
                                         {"min_length": 8192, "order": ["triton", "cudnn", "xla"]}]
    assert dispatch.auto_order("attention", 4096, "gpu", table) == ("cudnn", "triton", "xla")
    assert dispatch.auto_order("attention", 16384, "gpu", table) == ("triton", "cudnn", "xla")
    assert dispatch.auto_order("linear", 8192, "gpu", table) == ("triton", "xla")
    assert dispatch.auto_order("linear", 1024, "gpu", table) == ("xla",)  # nothing measured below 8K
