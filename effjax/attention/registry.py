"""Name -> attention method lookup: the module ``effjax.attention.<name>`` is the method."""

import dataclasses
import difflib
import importlib
import pkgutil

import effjax.attention as _package

# Modules in this package that hold shared code rather than a method.
_NOT_METHODS = frozenset({"registry", "common", "patterns", "kernel_attention"})


def names() -> list[str]:
    """Sorted names of all registered attention methods."""
    found = (m.name for m in pkgutil.iter_modules(_package.__path__))
    return sorted(n for n in found if n not in _NOT_METHODS and not n.startswith("_"))


def check_name(name: str) -> None:
    """Raises ValueError naming the close matches when ``name`` is not a registered method."""
    known = names()
    if name in known:
        return
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown attention method {name!r}.{hint} Known methods: {', '.join(known)}.")


def _method_module(name: str):
    check_name(name)
    return importlib.import_module(f"effjax.attention.{name}")


def make(name: str, **params):
    """Returns the linen Module of method ``name`` built with ``params`` (paper defaults otherwise)."""
    cls = _method_module(name).Attention
    accepted = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name"))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"Attention method {name!r} has no parameter(s) {', '.join(unknown)}. "
            f"Accepted: {', '.join(accepted) or '(none)'}."
        )
    return cls(**params)


def resolve_per_layer(attention, num_layers: int) -> tuple[str, ...]:
    """Expands one method name, or checks a per-layer sequence of names, into ``num_layers`` names."""
    if isinstance(attention, str):
        # A command line gives one string: 'softmax,performer' or "('softmax','performer')".
        attention = [part.strip(" '\"()[]") for part in attention.split(",")]
        attention = [part for part in attention if part]
    layer_names = tuple(attention)
    if len(layer_names) == 1:
        layer_names *= num_layers
    elif len(layer_names) != num_layers:
        raise ValueError(
            f"model.attention lists {len(layer_names)} methods but model.num_layers is {num_layers}: "
            "give one name for all layers or exactly one name per layer."
        )
    for name in layer_names:
        check_name(name)
    return layer_names
