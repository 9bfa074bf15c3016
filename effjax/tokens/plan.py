"""``model.tokens`` resolved into a static plan: which method reduces on which layer to how many tokens.

The one place that reads the model's ``tokens`` field (a dict or ConfigDict with ``method``, ``r``, ``keep``,
``layers``, ``prop_attn`` and ``params``); the model and the config check both call ``plan``.
"""

import collections.abc
import dataclasses

from effjax.tokens import registry, schedule
from effjax.tokens._spec import PLACES
from effjax.tokens.stats import check_probabilities

FIELDS = {"method": "", "r": None, "keep": None, "layers": None, "prop_attn": True, "params": None,
          "flops_target": None, "flops_weight": 5.0}


@dataclasses.dataclass(frozen=True)
class Step:
    """One layer's reduction to ``keep`` tokens (of which ``prefix`` are protected)."""

    method: str
    params: tuple  # sorted (name, value) pairs, hashable for linen
    keep: int
    prefix: int
    place: str
    layer: int

    def apply_to(self, x, tokens, stats, *, deterministic: bool, name: str = "tokens"):
        """Runs the method's ``Reducer`` (created in the calling module's scope as ``name``)."""
        reducer = registry.module(self.method).Reducer(**dict(self.params), name=name)
        x, tokens = reducer(x, tokens, stats, keep=self.keep, prefix=self.prefix, deterministic=deterministic)
        if x.shape[1] != self.keep or tokens.sizes.shape[1] != self.keep:
            raise AssertionError(f"token method {self.method!r} returned {x.shape[1]} tokens on layer "
                                 f"{self.layer}; the schedule asked for {self.keep}.")
        return x, tokens


@dataclasses.dataclass(frozen=True)
class Plan:
    method: str
    params: tuple
    counts: tuple  # tokens left after each layer's reduction, None where a layer keeps its tokens
    prefix: int
    prop_attn: bool
    place: str
    flops_target: float | None = None  # GMACs the learned rates are pulled to (model.tokens.flops_target)
    flops_weight: float = 5.0

    def flops_loss(self, gmacs):
        """DiffRate's rate loss ``flops_weight * (GMACs - flops_target)^2`` (Sec. 3.3)."""
        return self.flops_weight * (gmacs - self.flops_target) ** 2

    def step(self, layer: int) -> Step | None:
        keep = self.counts[layer]
        return None if keep is None else Step(self.method, self.params, keep, self.prefix, self.place, layer)


def _as_dict(value) -> dict:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return dict(value or {})


def method_params(method: str, params) -> dict:
    """The params set for ``method``: ``params`` keyed by method (as configs hold every method's table) or flat;
    unset (None) values dropped."""
    params = _as_dict(params)
    keyed = {key for key, val in params.items() if isinstance(val, collections.abc.Mapping)}
    if keyed:
        for key in keyed:
            registry.check_name(key)
        params = _as_dict(params.get(method))
    return {key: val for key, val in params.items() if val is not None}


def plan(tokens, *, num_layers: int, num_tokens: int, prefix: int, layer_methods=()) -> Plan | None:
    """The static plan of ``tokens`` (``model.tokens``) for a model of ``num_layers`` layers seeing
    ``num_tokens`` tokens (``prefix`` of them CLS/distillation tokens); None when no method is set."""
    tokens = _as_dict(tokens)
    unknown = sorted(set(tokens) - set(FIELDS))
    if unknown:
        raise ValueError(f"model.tokens has no field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}.")
    fields = {**FIELDS, **{k: v for k, v in tokens.items() if v is not None}}
    method = fields["method"]
    if not method:
        return None
    spec = registry.spec(method)
    if spec.place not in PLACES:
        raise TypeError(f"effjax.tokens.{method}: SPEC.place must be one of {PLACES}, got {spec.place!r}.")
    if not spec.min_prefix <= prefix <= spec.max_prefix:
        raise ValueError(f"token method {method!r} keeps {spec.min_prefix}..{spec.max_prefix} prefix tokens "
                         f"(CLS, distillation), but this model has {prefix}; use a model with "
                         f"{'a CLS token (model.pooling=cls)' if prefix < spec.min_prefix else 'fewer prefix tokens'}"
                         " or another method.")
    params = method_params(method, fields["params"])
    registry.check_params(method, params)
    learned_rate = bool(spec.rate_param and params.get(spec.rate_param))
    target = fields["flops_target"]
    if target not in (None, "") and not learned_rate:
        fix = (f"set model.tokens.params.{method}.{spec.rate_param}=True" if spec.rate_param else
               "use a method with learned rates (diffrate with params.diffrate.learned=True)")
        raise ValueError(f"model.tokens.flops_target pulls learned token rates toward a FLOPs target, but "
                         f"{method!r} has no learned rate here; {fix}, or unset flops_target.")
    fixed = schedule.is_set(fields["r"], "r") or schedule.is_set(fields["keep"], "keep")
    if learned_rate and not fixed:
        counts = schedule.learned_capacity(num_tokens, num_layers, fields["layers"])
    else:
        counts = schedule.counts(num_tokens, prefix, num_layers, r=fields["r"], keep=fields["keep"],
                                 layers=fields["layers"], max_removed=spec.max_removed)
    if {"probabilities", "cls_attention"} & set(spec.needs):
        for layer, keep in enumerate(counts):
            if keep is not None and spec.place == "attention" and layer < len(layer_methods):
                check_probabilities(layer_methods[layer], layer, method)
    prop_attn = bool(fields["prop_attn"]) and spec.merges  # a pruner's sizes stay 1: its log-size bias is 0
    return Plan(method, tuple(sorted(params.items())), counts, prefix, prop_attn, spec.place,
                None if target in (None, "") else float(target), float(fields["flops_weight"]))
