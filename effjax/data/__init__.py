"""Data sources by name: ``make_source(name, split, **params)`` returns a grain random-access source.

Every source has ``task`` ('classification' or 'lm'), ``vocab_size`` (pad id 0 included),
``num_classes`` (None for 'lm') and ``max_length``. Elements are ``{'inputs': int32[max_length],
'targets': int32[]}`` for classification and ``{'inputs': int32[max_length]}`` for 'lm'; 0 is padding.
Batching, shuffling and process slicing live in ``effjax.data.pipeline``.

A source is a ``common.Source`` subclass that sets ``name`` (its ``config.data.name``) in a module of this
package; they are found by importing the package's modules, so adding a source is adding a class.
"""

import functools
import importlib
import inspect
import pkgutil

from effjax.data import common


@functools.cache
def _sources() -> dict:
    """``{name: class}`` of every ``common.Source`` subclass with a ``name`` defined in this package's modules."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, common.Source) and obj.__module__ == module.__name__
                    and "name" in vars(obj)):
                found[obj.name] = obj
    return found


def names() -> list[str]:
    """Registered source names, sorted."""
    return sorted(_sources())


def params_of(name: str) -> dict:
    """The keyword parameters of source ``name`` with their defaults."""
    cls = _get(name)
    return {p.name: p.default for p in inspect.signature(cls).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_source(name: str, split: str, **params) -> common.Source:
    """Builds source ``name`` for ``split`` ('train', 'validation' or 'test'); every param has a default."""
    accepted = params_of(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise common.unknown_name_error("param", unknown[0], accepted, where=f" of data source {name!r}")
    common.check_split(split)
    return _get(name)(split, **params)


def _get(name: str):
    sources = _sources()
    if name not in sources:
        raise common.unknown_name_error("data source", name, sources)
    return sources[name]
