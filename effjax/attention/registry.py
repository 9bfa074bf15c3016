"""Name -> attention method lookup: the module ``effjax.attention.<name>`` is the method."""

import dataclasses
import difflib
import importlib
import pkgutil
import typing

import effjax.attention as _package

# Modules in this package that hold shared code rather than a method.
_NOT_METHODS = frozenset({"registry", "common", "patterns", "kernel_attention", "grid", "fftconv", "scan", "permute",
                         "recurrent", "gated_linear", "delta_rule", "dplr", "decoding"})


def package_modules(package, shared) -> list[str]:
    """Sorted names of ``package``'s modules, without the ``shared`` ones and those starting with '_'."""
    found = (m.name for m in pkgutil.iter_modules(package.__path__))
    return sorted(n for n in found if n not in shared and not n.startswith("_"))


def check_known(name: str, known, kind: str, where: str = "") -> None:
    """Raises ValueError naming the close matches when ``name`` is not in ``known`` (``kind``: what it names)."""
    if name in known:
        return
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown {kind} {name!r}{where}.{hint} Known methods: {', '.join(known)}.")


def names() -> list[str]:
    """Sorted names of all registered attention methods."""
    return package_modules(_package, _NOT_METHODS)


def check_name(name: str) -> None:
    """Raises ValueError naming the close matches when ``name`` is not a registered method."""
    check_known(name, names(), "attention method")


def _method_module(name: str):
    check_name(name)
    return importlib.import_module(f"effjax.attention.{name}")


def _init_fields(name: str):
    cls = _method_module(name).Attention
    return cls, [f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def defaults(name: str) -> dict:
    """``{param: paper default}`` of method ``name``; ``dropout_rate`` is left to the model's setting."""
    _, fields = _init_fields(name)
    return {f.name: f.default for f in fields if f.name != "dropout_rate" and f.default is not dataclasses.MISSING}


def param_type(name: str, param: str) -> type:
    """The declared type of ``param`` of method ``name`` with ``None`` removed (``tuple | None`` -> tuple)."""
    cls, _ = _init_fields(name)
    return field_type(cls, param)


def field_type(cls, param: str) -> type:
    """The declared type of dataclass field ``param`` of ``cls`` with ``None`` removed; ``object`` if unknown."""
    try:
        hint = typing.get_type_hints(cls).get(param, object)
    except NameError:  # an annotation naming something the module does not import
        hint = object
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    origin = typing.get_origin(options[0]) or options[0]
    return origin if isinstance(origin, type) else object


PROJECTIONS = ("query", "key", "value")


def projections(name: str, params: dict | None = None) -> tuple[str, ...]:
    """The input projections a model makes for method ``name`` built with ``params``, in ``PROJECTIONS`` order.

    A method module may define ``projections(params) -> tuple[str, ...]`` (default: all three). ``query`` and
    ``value`` are always made; without ``key`` the model passes ``k = q`` and the method makes its keys from q.
    """
    hook = getattr(_method_module(name), "projections", None)
    if hook is None:
        return PROJECTIONS
    wanted = tuple(hook(dict(params or {})))
    if not {"query", "value"} <= set(wanted) <= set(PROJECTIONS):
        raise TypeError(f"effjax.attention.{name}.projections must return 'query', 'value' and optionally 'key', "
                        f"got {wanted!r}.")
    return tuple(p for p in PROJECTIONS if p in wanted)


def make(name: str, **params):
    """Returns the linen Module of method ``name`` built with ``params`` (paper defaults otherwise)."""
    cls, fields = _init_fields(name)
    accepted = sorted(f.name for f in fields)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"Attention method {name!r} has no parameter(s) {', '.join(unknown)}. "
            f"Accepted: {', '.join(accepted) or '(none)'}."
        )
    return cls(**params)
