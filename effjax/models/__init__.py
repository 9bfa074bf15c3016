"""Model families, looked up by name: a module ``effjax.models.<name>`` that defines ``Model`` (a linen Module)
and ``TASK`` (the task it trains on: 'classification', 'lm', or 'pretrain', which reads only the inputs of any
source) is a family. Adding a family is adding a file.
"""

import dataclasses
import difflib
import functools
import importlib
import pkgutil

import jax.numpy as jnp


@functools.cache
def _families() -> dict:
    """``{name: module}`` of every family module in this package (the others hold shared layers)."""
    modules = (importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__))
    return {module.__name__.rpartition(".")[2]: module for module in modules
            if hasattr(module, "Model") and hasattr(module, "TASK")}


def names() -> list[str]:
    """Sorted names of the model families."""
    return sorted(_families())


def task_of(name: str) -> str:
    """The task ('classification', 'lm' or 'pretrain') a model family trains on."""
    _check(name)
    return _families()[name].TASK


def _check(name):
    if name not in _families():
        close = difflib.get_close_matches(str(name), names(), n=2)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model {name!r} (config.model.name).{hint} Known: {', '.join(names())}.")


def build(name: str, *, vocab_size: int, num_classes: int | None, **params):
    """Builds model family ``name``; ``params`` are its fields (``dtype`` may be a string)."""
    _check(name)
    cls = _families()[name].Model
    accepted = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "vocab_size", "num_classes"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"config.model has no field(s) {', '.join(unknown)} for model {name!r}. "
                         f"Accepted: {', '.join(sorted(accepted))}.")
    if isinstance(params.get("dtype"), str):
        params["dtype"] = jnp.dtype(params["dtype"])
    if isinstance(params.get("attention"), list):
        params["attention"] = tuple(params["attention"])
    if task_of(name) == "classification":
        params["num_classes"] = num_classes
    return cls(vocab_size=vocab_size, **params)
