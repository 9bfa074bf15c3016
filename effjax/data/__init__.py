"""Data sources by name: ``make_source(name, split, **params)`` returns a grain random-access source.

Every source has ``task`` ('classification' or 'lm'), ``vocab_size`` (pad id 0 included),
``num_classes`` (None for 'lm') and ``max_length``. Elements are ``{'inputs': int32[max_length],
'targets': int32[]}`` for classification and ``{'inputs': int32[max_length]}`` for 'lm'; 0 is padding.
Batching, shuffling and process slicing live in ``effjax.data.pipeline``.
"""

import inspect

from effjax.data import bytes_lm, common, listops, tfds_sources

_SOURCES = {
    "listops": listops.ListOps,
    "bytes_lm": bytes_lm.BytesLM,
    "tfds_imdb": tfds_sources.TfdsImdb,  # LRA Text
    "tfds_cifar10": tfds_sources.TfdsCifar10,  # LRA Image
}


def names() -> list[str]:
    """Registered source names, sorted."""
    return sorted(_SOURCES)


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
    if name not in _SOURCES:
        raise common.unknown_name_error("data source", name, _SOURCES)
    return _SOURCES[name]
