"""How many tokens each layer keeps: ToMe's ``r`` forms, keep ratios per stage, turned into static counts.

* ``r``: an int (the same r on every reducing layer), a per-layer list or tuple (padded with zeros, ToMe's
  ``parse_r``), or ToMe's ``(r, inflection)`` written as a string, ``'(16,-1)'``: a linear ramp from
  ``int(r (1 - inflection))`` to ``2 r - int(r (1 - inflection))`` over the layers, the paper's decreasing
  schedule. (Only the string spelling means a ramp: linen turns a model field's lists into tuples, so a Python
  tuple could not be told from a per-layer list.)
  Each layer removes ``min(r_l, cap)`` tokens, where ``cap`` is the method's limit (ToMe: half the
  non-prefix tokens; the paper applies it silently, and so does this).
* ``keep``: DynamicViT's ratio per stage: stage k keeps ``int(P * rho_1 * ... * rho_k)`` of the ``P``
  original non-prefix tokens (one float is the same ratio at every stage: 0.7 gives 137, 96, 67 of 196).
* ``layers``: the layers that reduce (default: every layer).
The command line spells them as strings: ``r='16'``, ``r='(16,-1)'``, ``r='8,8,4'``, ``keep='0.7'``,
``layers='3,6,9'``.
"""

import ast


def _literal(value, field: str):
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"model.tokens.{field}={value!r} is not a number, a list like '8,8,4' or a tuple like "
                         "'(16,-1)'.") from None


def is_set(value, field: str) -> bool:
    """Whether a schedule field holds a value (not None, '' or an empty tuple)."""
    return _literal(value, field) not in (None, ())


def parse_layers(layers, num_layers: int) -> tuple[int, ...]:
    """The reducing layers: ``layers`` (ints, or a string '3,6,9'), default all ``num_layers``."""
    layers = _literal(layers, "layers")
    if layers is None or layers == ():
        return tuple(range(num_layers))
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"model.tokens.layers has {layer!r}, outside the {num_layers} layers "
                             f"(0..{num_layers - 1}).")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise ValueError(f"model.tokens.layers {layers} must be increasing without repeats.")
    return layers


def parse_r(r, num_layers: int) -> tuple[int, ...] | None:
    """Removals per layer from ToMe's ``r`` forms (see the module doc), or None when ``r`` is unset."""
    ramp = isinstance(r, str) and r.strip().startswith("(")
    r = _literal(r, "r")
    if r is None:
        return None
    if isinstance(r, tuple) and not ramp:
        r = list(r)  # '8,8,4', (8, 8, 4) and [8, 8, 4] are per-layer lists; only '(16,-1)' is (r, inflection)
    if isinstance(r, bool) or not isinstance(r, (int, tuple, list)):
        raise ValueError(f"model.tokens.r must be an int, a per-layer list or (r, inflection), got {r!r}.")
    if isinstance(r, int):
        removals = [r] * num_layers
    elif isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"model.tokens.r as a tuple is ToMe's (r, inflection), got {r!r}; write a "
                             "per-layer list as '8,8,4' or [8, 8, 4].")
        base, inflection = r
        if not -1 <= inflection <= 1:
            raise ValueError(f"model.tokens.r=(r, inflection) needs inflection in [-1, 1], got {inflection}.")
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        step = (high - low) / max(num_layers - 1, 1)
        removals = [int(low + step * i) for i in range(num_layers)]
    else:
        if len(r) > num_layers:
            raise ValueError(f"model.tokens.r lists {len(r)} removals but the model has {num_layers} layers.")
        removals = list(r) + [0] * (num_layers - len(r))
    for layer, count in enumerate(removals):
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"model.tokens.r gives layer {layer} {count!r} tokens to remove; it must be an int "
                             ">= 0.")
    return tuple(removals)


def parse_keep(keep, stages: int) -> tuple[float, ...] | None:
    """Cumulative keep ratios of the ``stages`` reducing layers (see the module doc), or None when unset."""
    keep = _literal(keep, "keep")
    if keep is None:
        return None
    ratios = [keep] * stages if isinstance(keep, (int, float)) else list(keep)
    if len(ratios) != stages:
        raise ValueError(f"model.tokens.keep lists {len(ratios)} ratios for {stages} reducing layers "
                         "(model.tokens.layers); give one ratio or one per reducing layer.")
    cumulative, total = [], 1.0
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"model.tokens.keep ratios must be in (0, 1], got {ratio!r}.")
        total *= ratio
        cumulative.append(total)
    return tuple(cumulative)


def counts(num_tokens: int, prefix: int, num_layers: int, *, r=None, keep=None, layers=None,
           max_removed=None) -> tuple:
    """Tokens left after each layer's reduction (None where a layer does not reduce), from ``r`` or ``keep``.

    ``max_removed(n, prefix)`` is the method's per-reduction cap (``Spec.max_removed``). A schedule that would
    leave no non-prefix token raises, naming the layer and the counts.
    """
    r_set, keep_set = _literal(r, "r") is not None, _literal(keep, "keep") is not None
    if not (r_set or keep_set):
        raise ValueError("model.tokens needs a schedule: set model.tokens.r (ToMe: '16', '(16,-1)', '8,8,4') "
                         "or model.tokens.keep (ratio per stage, e.g. '0.7' with layers '3,6,9').")
    if r_set and keep_set:
        raise ValueError("model.tokens.r and model.tokens.keep are both set; use one schedule.")
    reducing = parse_layers(layers, num_layers)
    cap = max_removed or (lambda n, p: n - p)
    out, n = [None] * num_layers, num_tokens
    patches = num_tokens - prefix
    removals = parse_r(r, num_layers)
    ratios = parse_keep(keep, len(reducing)) if removals is None else None
    for stage, layer in enumerate(reducing):
        if removals is not None:
            want = removals[layer]
            if want == 0:
                continue
            left = n - min(want, cap(n, prefix))
        else:
            left = prefix + int(patches * ratios[stage])
            if left > n:
                raise ValueError(f"model.tokens.keep would grow layer {layer} from {n} to {left} tokens.")
            if n - left > cap(n, prefix):
                raise ValueError(f"model.tokens.keep asks layer {layer} to remove {n - left} of {n} tokens; this "
                                 f"method removes at most {cap(n, prefix)} per layer.")
        if left <= prefix:
            asked = removals[layer] if removals is not None else n - left
            raise ValueError(f"model.tokens: layer {layer} would remove {asked} of its {n} tokens, leaving no "
                             f"token besides the {prefix} prefix token(s); lower model.tokens.r or raise keep.")
        if left < n:
            out[layer] = left
            n = left
    return tuple(out)


def learned_capacity(num_tokens: int, num_layers: int, layers=None) -> tuple:
    """The layout of a learned rate without a fixed schedule (DiffRate): each reducing layer (``layers``; by
    default every layer but the first, which DiffRate never compresses) keeps its full length as the capacity
    and its learned count masks the rest."""
    reducing = parse_layers(layers, num_layers) if is_set(layers, "layers") else range(1, num_layers)
    return tuple(num_tokens if layer in reducing else None for layer in range(num_layers))
