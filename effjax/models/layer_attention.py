"""Which attention method each layer of a model runs, and with which params: the one place that reads the
model's attention fields (``attention``, ``attention_params``, ``attention_dropout_rate``, ``attention_impl``,
``full_attention_layers``, ``full_attention``). Config validation and ``Backbone`` both call ``resolve``.

Precedence for one layer's params, highest first: the method's own entry in ``attention_params`` (``None``
meaning "unset"), then the model-wide settings (``attention_dropout_rate`` as ``dropout_rate``;
``attention_impl`` as ``impl`` for methods with a Pallas kernel path; the layer's index and the number of layers
as ``layer_idx`` and ``num_layers`` for methods whose init depends on depth), then the method's paper defaults.
"""

import collections.abc

from effjax import attention as attention_lib
from effjax.kernels import dispatch
from effjax.kernels.backend import check_impl

# The model fields ``resolve`` reads, with the defaults ``Backbone`` gives them.
FIELDS = {
    "num_layers": 4,
    "attention": "softmax",
    "attention_params": None,
    "attention_dropout_rate": 0.0,
    "attention_impl": "xla",
    "full_attention_layers": (),
    "full_attention": "softmax",
}


def has_kernel_path(method: str) -> bool:
    """Whether attention method ``method`` declares a Pallas kernel path (it then takes ``impl``)."""
    return attention_lib.capabilities(method).pallas


def attention_names(attention) -> tuple[str, ...]:
    """``model.attention`` as a tuple of names: one name, a sequence of names, or a command line's spelling
    of a list in the config's string field (``'performer,softmax'`` or ``"('performer', 'softmax')"``)."""
    if isinstance(attention, str):
        parts = (part.strip(" '\"()[]") for part in attention.split(","))
        return tuple(part for part in parts if part)
    return tuple(attention)


def layer_methods(attention, num_layers: int, full_attention_layers=(), full_attention: str = "softmax"):
    """The method name of each of ``num_layers`` layers: ``attention`` (one name for all layers or one per
    layer), with the layers listed in ``full_attention_layers`` (MASFormer) replaced by ``full_attention``."""
    methods = list(attention_names(attention))
    if len(methods) == 1:
        methods *= num_layers
    elif len(methods) != num_layers:
        raise ValueError(
            f"model.attention lists {len(methods)} methods but model.num_layers is {num_layers}: "
            "give one name for all layers or exactly one name per layer.")
    for index in full_attention_layers:
        if not 0 <= index < num_layers:
            raise ValueError(f"model.full_attention_layers has {index}, outside the "
                             f"{num_layers} layers (0..{num_layers - 1}).")
        methods[index] = full_attention
    for name in {*methods, full_attention}:
        attention_lib.check_name(name)
    return tuple(methods)


def method_params(method: str, attention_params) -> dict:
    """The params set for ``method`` in ``attention_params``, without the unset (``None``) ones.

    ``attention_params`` is keyed by method, ``{method: {param: value}}`` (as configs hold it), or flat,
    ``{param: value}``, for every layer.
    """
    if hasattr(attention_params, "to_dict"):  # an ml_collections ConfigDict
        attention_params = attention_params.to_dict()
    attention_params = dict(attention_params or {})
    keyed = {key for key, val in attention_params.items() if isinstance(val, collections.abc.Mapping)}
    if keyed:
        for key in sorted(keyed):
            attention_lib.check_name(key)
        flat = sorted(set(attention_params) - keyed)
        if flat:
            raise ValueError(f"attention_params mixes per-method entries ({', '.join(sorted(keyed))}) with "
                             f"flat ones ({', '.join(flat)}); put every param under its method's name.")
        attention_params = dict(attention_params.get(method, {}))
    return {key: val for key, val in attention_params.items() if val is not None}


def layer_params(method: str, attention_params, attention_dropout_rate: float, attention_impl: str) -> dict:
    """One layer's params: the method's own settings win over the model-wide dropout rate and impl."""
    params = method_params(method, attention_params)
    params.setdefault("dropout_rate", attention_dropout_rate)
    if has_kernel_path(method):
        params.setdefault("impl", attention_impl)
    return params


def check_attention_impl(attention_impl, methods) -> None:
    """ValueError for an unknown ``attention_impl``, or kernels only (no 'xla' or 'auto' to fall back to) when no
    layer's method has a kernel path."""
    check_impl("model.attention_impl", attention_impl)
    kernels_only = not {"xla", "auto"} & set(dispatch.parse(attention_impl))
    if kernels_only and not any(map(has_kernel_path, methods)):
        with_kernels = [name for name in attention_lib.names() if has_kernel_path(name)]
        used = ", ".join(sorted(set(methods)))
        raise ValueError(f"model.attention_impl={dispatch.spec(attention_impl)!r}, but no layer's method ({used}) "
                         f"has a kernel path; these do: {', '.join(with_kernels)}.")


def resolve(fields) -> tuple[tuple[str, dict], ...]:
    """``((method, params), ...)``, one pair per layer, from the model's attention fields.

    ``fields`` is a mapping (a ``config.model`` ConfigDict, a dict of a ``Backbone``'s fields); keys missing
    from it take ``FIELDS``' defaults and keys not in ``FIELDS`` are ignored.
    """
    get = {key: fields[key] if key in fields else default for key, default in FIELDS.items()}
    methods = layer_methods(get["attention"], get["num_layers"], get["full_attention_layers"],
                            get["full_attention"])
    check_attention_impl(get["attention_impl"], methods)
    layers = []
    for index, method in enumerate(methods):
        params = layer_params(method, get["attention_params"], get["attention_dropout_rate"], get["attention_impl"])
        layers.append((method, with_depth(method, params, index, len(methods))))
    return tuple(layers)


DEPTH_FIELDS = ("layer_idx", "num_layers")


def with_depth(method: str, params: dict, index: int, num_layers: int) -> dict:
    """``params`` plus the layer's position in the stack for methods whose init depends on depth (a method
    with both ``DEPTH_FIELDS``, e.g. RWKV-7); values set in ``attention_params`` win."""
    if set(DEPTH_FIELDS) <= set(attention_lib.defaults(method)):
        params = {"layer_idx": index, "num_layers": num_layers, **params}
    return params
