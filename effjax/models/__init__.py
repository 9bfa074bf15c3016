"""Model families, looked up by name: the module ``effjax.models.<name>`` defines ``Model``."""

import dataclasses
import difflib
import importlib

import jax.numpy as jnp

# Families and the task each one trains on.
FAMILIES = {"encoder_classifier": "classification", "decoder_lm": "lm", "vit_classifier": "classification"}


def names() -> list[str]:
    """Sorted names of the model families."""
    return sorted(FAMILIES)


def task_of(name: str) -> str:
    """The task ('classification' or 'lm') a model family trains on."""
    _check(name)
    return FAMILIES[name]


def _check(name):
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), names(), n=2)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model {name!r} (config.model.name).{hint} Known: {', '.join(names())}.")


def build(name: str, *, vocab_size: int, num_classes: int | None, **params):
    """Builds model family ``name``; ``params`` are its fields (``dtype`` may be a string)."""
    _check(name)
    cls = importlib.import_module(f"effjax.models.{name}").Model
    accepted = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "vocab_size", "num_classes"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"config.model has no field(s) {', '.join(unknown)} for model {name!r}. "
                         f"Accepted: {', '.join(sorted(accepted))}.")
    if isinstance(params.get("dtype"), str):
        params["dtype"] = jnp.dtype(params["dtype"])
    if isinstance(params.get("attention"), list):
        params["attention"] = tuple(params["attention"])
    if FAMILIES[name] == "classification":
        params["num_classes"] = num_classes
    return cls(vocab_size=vocab_size, **params)
