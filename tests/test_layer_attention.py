"""The one resolver of a model's per-layer attention: names, MASFormer layers, params and their precedence."""

import pytest

from configs import common
from effjax.models.layer_attention import attention_names, layer_methods, method_params, resolve


def test_per_layer_methods_and_params_with_precedence():
    fields = dict(
        num_layers=3,
        attention=("sliding_window", "hyena", "sliding_window"),
        attention_params={"sliding_window": {"window": 3, "impl": "xla", "dropout_rate": 0.5},
                          "softmax": {"dropout_rate": None}},
        attention_dropout_rate=0.2,
        attention_impl="pallas",
        full_attention_layers=(2,),
        full_attention="softmax",
    )
    assert resolve(fields) == (
        # Its own impl and dropout rate win over the model's attention_impl and attention_dropout_rate.
        ("sliding_window", {"window": 3, "impl": "xla", "dropout_rate": 0.5}),
        # No kernel path: no impl; the model's dropout rate.
        ("hyena", {"dropout_rate": 0.2}),
        # MASFormer's full layer, with its own entry unset (None): the model's settings.
        ("softmax", {"dropout_rate": 0.2, "impl": "pallas"}),
    )


def test_model_wide_impl_reaches_only_methods_with_a_kernel_path():
    layers = resolve(dict(num_layers=2, attention="sliding_window,hyena", attention_impl="pallas"))
    assert layers == (("sliding_window", {"dropout_rate": 0.0, "impl": "pallas"}), ("hyena", {"dropout_rate": 0.0}))


def test_a_base_config_resolves_to_its_defaults():
    model = common.get_base_config().model
    assert resolve(model) == (("softmax", {"dropout_rate": 0.1, "impl": "xla"}),) * 4


def test_command_line_spellings_of_a_list():
    assert attention_names("softmax") == ("softmax",)
    assert attention_names("softmax, performer") == ("softmax", "performer")
    assert attention_names("('softmax', 'performer')") == ("softmax", "performer")
    assert attention_names(["softmax"]) == ("softmax",)


def test_bad_layer_lists_name_the_field():
    with pytest.raises(ValueError, match="lists 3 methods but model.num_layers is 2"):
        layer_methods(("softmax",) * 3, 2)
    with pytest.raises(ValueError, match="Unknown attention method 'softmx'"):
        layer_methods("softmax,softmx", 2)
    with pytest.raises(ValueError, match="Unknown attention method 'softmx'"):
        layer_methods("softmax", 2, full_attention="softmx")
    with pytest.raises(ValueError, match="full_attention_layers has 2, outside the 2 layers"):
        layer_methods("softmax", 2, full_attention_layers=(2,))
    with pytest.raises(ValueError, match=r"attention_impl='pallas', but no layer's method \(hyena\)"):
        resolve(dict(num_layers=1, attention="hyena", attention_impl="pallas"))


def test_attention_params_pick_each_layers_own_method():
    keyed = {"linformer": {"k": 8}, "sliding_window": {"window": 3, "unused": None}}
    assert method_params("linformer", keyed) == {"k": 8}
    assert method_params("sliding_window", keyed) == {"window": 3}
    assert method_params("softmax", keyed) == {}
    assert method_params("softmax", {"unused": None}) == {}
    with pytest.raises(ValueError, match="mixes per-method entries"):
        method_params("linformer", {"linformer": {"k": 8}, "window": 3})
    with pytest.raises(ValueError, match="Unknown attention method 'linformr'"):
        method_params("linformer", {"linformr": {"k": 8}})


def test_depth_dependent_methods_get_their_layer_index_and_the_stack_depth(monkeypatch):
    from effjax.models import layer_attention

    real = layer_attention.attention_lib.defaults
    monkeypatch.setattr(layer_attention.attention_lib, "defaults",
                        lambda name: {**real(name), "layer_idx": 0, "num_layers": 1} if name == "mamba" else real(name))
    layers = resolve({"num_layers": 3, "attention": "mamba,softmax,mamba",
                      "attention_params": {"mamba": {"num_layers": 12}}})
    assert layers[0][1]["layer_idx"] == 0 and layers[2][1]["layer_idx"] == 2
    assert layers[0][1]["num_layers"] == 12  # set in attention_params: wins
    assert "layer_idx" not in layers[1][1]  # softmax's init does not depend on depth
