"""Name -> token-reduction method lookup: the module ``effjax.tokens.<name>`` is the method."""

import dataclasses
import importlib

import effjax.tokens as _package
from effjax.attention.registry import check_known, field_type, package_modules
from effjax.tokens._spec import Spec

# Modules in this package that hold shared code rather than a method.
_NOT_METHODS = frozenset({"registry", "state", "stats", "schedule", "plan", "flops"})


def names() -> list[str]:
    """Sorted names of all token-reduction methods."""
    return package_modules(_package, _NOT_METHODS)


def check_name(name: str) -> None:
    """Raises ValueError naming the close matches when ``name`` is not a token-reduction method."""
    check_known(name, names(), "token-reduction method", " (config.model.tokens.method)")


def module(name: str):
    check_name(name)
    return importlib.import_module(f"effjax.tokens.{name}")


def spec(name: str) -> Spec:
    """The ``SPEC`` that method ``name`` declares."""
    declared = getattr(module(name), "SPEC", None)
    if not isinstance(declared, Spec):
        raise TypeError(f"effjax.tokens.{name} must declare SPEC = Spec(...), got {declared!r}.")
    return declared


def _fields(name: str):
    cls = module(name).Reducer
    return cls, [f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def defaults(name: str) -> dict:
    """``{param: paper default}`` of method ``name``."""
    _, fields = _fields(name)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def check_params(name: str, params) -> None:
    """ValueError naming the accepted params when ``params`` has one method ``name`` does not take."""
    _, fields = _fields(name)
    accepted = sorted(f.name for f in fields)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"Token-reduction method {name!r} has no parameter(s) {', '.join(unknown)} "
                         f"(config.model.tokens.params.{name}). Accepted: {', '.join(accepted) or '(none)'}.")


def param_type(name: str, param: str) -> type:
    """The declared type of ``param`` of method ``name`` with ``None`` removed (for config placeholders)."""
    cls, _ = _fields(name)
    return field_type(cls, param)


def make(name: str, **params):
    """The linen ``Reducer`` of method ``name`` built with ``params`` (paper defaults otherwise)."""
    check_params(name, params)
    return module(name).Reducer(**params)
