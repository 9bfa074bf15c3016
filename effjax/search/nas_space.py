"""NAS over mixed attention in a decoder LM (Liu et al. 2022, arXiv 2207.13955; MASFormer, Zhang et al. 2023).

A ``Space`` (``effjax.search.space``) whose candidates are ``Genome`` values:

  * global genes: ``embed_dim``, ``num_layers``, ``num_heads`` and ``mlp_ratio`` (``mlp_dim = embed_dim *
    mlp_ratio``), each drawn from a list;
  * per-layer genes, for each of ``max(layer_counts)`` layers: the attention method (one of the registry's
    methods that declare ``causal``, computed from ``effjax.attention.names()`` when the space is built, so a
    method added later joins by itself; ``methods`` restricts the list) and a MASFormer flag: flagged layers
    run ``full_attention`` (softmax) whatever their method gene says (``model.full_attention_layers``).

**Heads and MLP width are global genes**, unlike mixFormer's per-layer heads and FFN dims: effjax's
``Backbone`` takes one ``num_heads`` and one ``mlp_dim`` for every block. Every embed width must divide by
every head count (checked when the space is built), so any combination of genes is a valid model.

As in mixFormer and HAT, the genes of layers at or past ``num_layers`` stay in the genome but are inert:
``canonical`` (and so ``key``) keeps only what the model computes, i.e. the sizes and each active layer's
effective method (a flagged layer's method gene is inert too). ``model_fields`` gives the fields for
``effjax.models.build("decoder_lm", ...)``; ``attention`` is a per-layer tuple there (a config's string
field takes ``",".join(...)`` of it).
"""

import dataclasses
import hashlib
import json

import numpy as np

from effjax import attention as attention_lib

NAME = "nas_mixed_attention"
GLOBALS = ("embed_dim", "num_layers", "num_heads", "mlp_ratio")
FIELDS = (*GLOBALS, "attention", "full_attention", "checksum")


@dataclasses.dataclass(frozen=True)
class Genome:
    """One candidate: the global genes, and per layer (all ``max_layers`` of them) a method and a MASFormer flag."""

    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    attention: tuple[str, ...]
    full_attention: tuple[bool, ...]


def causal_methods() -> list[str]:
    """Sorted names of the registered attention methods that can run causally (a decoder LM needs that)."""
    return [name for name in attention_lib.names() if attention_lib.capabilities(name).causal]


def _checksum(genes: dict) -> str:
    return hashlib.sha256(json.dumps(genes, sort_keys=True).encode()).hexdigest()[:16]


class NasSpace:
    """Decoder-LM architectures with a per-layer attention method (see the module docstring).

    The seed is the all-softmax model whose sizes are the first entry of each choice list, so put the baseline
    first (the defaults start with the sizes of the byte-LM proxy: d=64, 2 layers, 4 heads, MLP 4x). Without
    softmax among ``methods`` the seed runs it through the MASFormer flags, or else runs ``methods[0]``.
    ``mutation_rate`` is each gene's resampling probability (HAT's per-gene mutation); ``full_attention_genes``
    turns the MASFormer flags on. ``fixed_fields`` (e.g. ``max_length``, ``dropout_rate``, ``attention_params``)
    are added to every candidate's ``model_fields``.
    """

    name = NAME

    def __init__(self, *, embed_dims=(64, 32, 96, 128), layer_counts=(2, 1, 3, 4), head_counts=(4, 2, 8),
                 mlp_ratios=(4, 2), methods=None, full_attention_genes=True, full_attention="softmax",
                 mutation_rate=0.1, fixed_fields=None):
        known = causal_methods()
        if methods is None:
            methods = known
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"methods {unknown} are not causal-capable attention methods; known: {', '.join(known)}.")
        if full_attention not in known:
            raise ValueError(f"full_attention {full_attention!r} is not causal-capable; known: {', '.join(known)}.")
        self.methods = tuple(dict.fromkeys(methods))
        self.choices = {"embed_dim": tuple(embed_dims), "num_layers": tuple(layer_counts),
                        "num_heads": tuple(head_counts), "mlp_ratio": tuple(mlp_ratios)}
        for gene, values in self.choices.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{gene} choices must be a non-empty list without repeats, got {values}.")
            if any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in values):
                raise ValueError(f"{gene} choices must be positive numbers, got {values}.")
        for gene in ("embed_dim", "num_layers", "num_heads"):
            if not all(isinstance(v, int) for v in self.choices[gene]):
                raise ValueError(f"{gene} choices must be ints, got {self.choices[gene]}.")
        bad = [(e, h) for e in embed_dims for h in head_counts if e % h]
        if bad:
            raise ValueError(f"every embed dim must divide by every head count (heads are a global gene); "
                             f"these do not: {bad}.")
        odd = [(e, r) for e in embed_dims for r in mlp_ratios if e * r != int(e * r)]
        if odd:
            raise ValueError(f"embed_dim * mlp_ratio must be a whole MLP width; these are not: {odd}.")
        if not 0.0 <= mutation_rate <= 1.0:
            raise ValueError(f"mutation_rate must be in [0, 1], got {mutation_rate}.")
        self.max_layers = max(layer_counts)
        self.full_attention_genes = bool(full_attention_genes)
        self.full_attention = full_attention
        self.mutation_rate = float(mutation_rate)
        self.fixed_fields = dict(fixed_fields or {})

    # The genes as a flat list of names: globals, then "attention/i" and "full_attention/i" per layer.
    def _gene_names(self) -> list[str]:
        genes = [g for g in GLOBALS if len(self.choices[g]) > 1]
        if len(self.methods) > 1:
            genes += [f"attention/{i}" for i in range(self.max_layers)]
        if self.full_attention_genes:
            genes += [f"full_attention/{i}" for i in range(self.max_layers)]
        return genes

    def _values(self, gene: str) -> tuple:
        kind = gene.partition("/")[0]
        if kind == "attention":
            return self.methods
        if kind == "full_attention":
            return (False, True)
        return self.choices[gene]

    @staticmethod
    def _get(genome: Genome, gene: str):
        kind, _, index = gene.partition("/")
        value = getattr(genome, kind)
        return value[int(index)] if index else value

    @staticmethod
    def _set(genome: Genome, gene: str, value) -> Genome:
        kind, _, index = gene.partition("/")
        if not index:
            return dataclasses.replace(genome, **{kind: value})
        values = list(getattr(genome, kind))
        values[int(index)] = value
        return dataclasses.replace(genome, **{kind: tuple(values)})

    def _active(self, genome: Genome, gene: str) -> bool:
        """Whether changing ``gene`` alone changes the computation: a global, or a gene of an active layer
        that is not inert (a flagged layer's method; a flag on a layer whose method is ``full_attention``)."""
        kind, _, index = gene.partition("/")
        if not index:
            return True
        i = int(index)
        if i >= genome.num_layers:
            return False
        if kind == "full_attention":
            return genome.attention[i] != self.full_attention
        return not genome.full_attention[i]

    def seeds(self) -> list[Genome]:
        """The all-softmax model at the first choice of every size."""
        first = {gene: values[0] for gene, values in self.choices.items()}
        softmax = "softmax" in self.methods
        flags = not softmax and self.full_attention_genes and self.full_attention == "softmax"
        return [Genome(**first, attention=("softmax" if softmax else self.methods[0],) * self.max_layers,
                       full_attention=(flags,) * self.max_layers)]

    def mutate(self, candidate: Genome, rng: np.random.Generator) -> tuple[Genome, str]:
        """Resamples each gene with probability ``mutation_rate`` to a different value; when none is picked,
        one active gene is (so the child computes something else), or any gene when none is active. Returns
        the child and e.g. 'embed_dim 64->96; attention/1 softmax->performer'."""
        genes = self._gene_names()
        if not genes:
            raise ValueError("this NasSpace has a single candidate: every choice list has one entry.")
        picked = [g for g in genes if rng.random() < self.mutation_rate]
        if not picked:
            pool = [g for g in genes if self._active(candidate, g)] or genes
            picked = [pool[rng.integers(len(pool))]]
        child, changes = candidate, []
        for gene in picked:
            old = self._get(candidate, gene)
            options = [v for v in self._values(gene) if v != old]
            new = options[rng.integers(len(options))]
            child = self._set(child, gene, new)
            changes.append(f"{gene} {old}->{new}")
        return child, "; ".join(changes)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        """Uniform crossover: every gene (inert ones too) from ``a`` or ``b`` with probability 1/2."""
        child = a
        for gene in (*GLOBALS, *(f"{kind}/{i}" for kind in ("attention", "full_attention")
                                 for i in range(self.max_layers))):
            if rng.random() < 0.5:
                child = self._set(child, gene, self._get(b, gene))
        return child

    def layer_methods(self, candidate: Genome) -> tuple[str, ...]:
        """The method each active layer runs (a flagged layer runs ``full_attention``)."""
        return tuple(self.full_attention if full else method for method, full in
                     zip(candidate.attention[:candidate.num_layers], candidate.full_attention, strict=False))

    def canonical(self, candidate: Genome) -> dict:
        """What the model computes: sizes and each active layer's method (inert genes dropped)."""
        return {"embed_dim": candidate.embed_dim, "num_layers": candidate.num_layers,
                "num_heads": candidate.num_heads, "mlp_dim": self.mlp_dim(candidate),
                "layers": list(self.layer_methods(candidate))}

    def key(self, candidate: Genome) -> str:
        return hashlib.sha256(json.dumps(self.canonical(candidate), sort_keys=True).encode()).hexdigest()[:20]

    @staticmethod
    def mlp_dim(candidate: Genome) -> int:
        return int(candidate.embed_dim * candidate.mlp_ratio)

    def model_fields(self, candidate: Genome) -> dict:
        """Fields for ``effjax.models.build("decoder_lm", vocab_size=..., num_classes=None, **fields)`` (or a
        config's ``model``), over ``fixed_fields``: sizes, the active layers' method genes as a tuple, and the
        flagged layers as ``full_attention_layers``."""
        n = candidate.num_layers
        return {**self.fixed_fields, "embed_dim": candidate.embed_dim, "num_layers": n,
                "num_heads": candidate.num_heads, "mlp_dim": self.mlp_dim(candidate),
                "attention": tuple(candidate.attention[:n]),
                "full_attention_layers": tuple(i for i in range(n) if candidate.full_attention[i]),
                "full_attention": self.full_attention}

    def to_json(self, candidate: Genome) -> dict:
        genes = {"embed_dim": candidate.embed_dim, "num_layers": candidate.num_layers,
                 "num_heads": candidate.num_heads, "mlp_ratio": candidate.mlp_ratio,
                 "attention": list(candidate.attention), "full_attention": list(candidate.full_attention)}
        return {**genes, "checksum": _checksum(genes)}

    def from_json(self, data: dict) -> Genome:
        if not isinstance(data, dict):
            raise ValueError(f"a {NAME} genome is a JSON object, got {type(data).__name__}.")
        missing = [f for f in FIELDS if f not in data]
        extra = sorted(set(data) - set(FIELDS))
        if missing or extra:
            raise ValueError(f"genome fields: missing {missing}, unexpected {extra}; expected {list(FIELDS)}.")
        genes = {f: data[f] for f in FIELDS if f != "checksum"}
        for gene in GLOBALS:
            value = genes[gene]
            types = int | float if gene == "mlp_ratio" else int  # 64.0 would build a float-sized model
            if isinstance(value, bool) or not isinstance(value, types) or value not in self.choices[gene]:
                raise ValueError(f"genome {gene}={value!r} is not one of {list(self.choices[gene])}.")
        for gene in ("attention", "full_attention"):
            value = genes[gene]
            if not isinstance(value, list | tuple) or len(value) != self.max_layers:
                raise ValueError(f"genome {gene} must be a list of {self.max_layers} entries (one per layer), "
                                 f"got {value!r}.")
        unknown = [m for m in genes["attention"] if not isinstance(m, str) or m not in self.methods]
        if unknown:
            raise ValueError(f"genome attention has unknown method(s) {unknown}; known: {', '.join(self.methods)}.")
        if not all(isinstance(flag, bool) for flag in genes["full_attention"]):
            raise ValueError(f"genome full_attention must hold booleans, got {genes['full_attention']!r}.")
        if not self.full_attention_genes and any(genes["full_attention"]):
            raise ValueError("genome full_attention flags a layer, but this space has full_attention_genes=False.")
        genes["attention"], genes["full_attention"] = list(genes["attention"]), list(genes["full_attention"])
        if data["checksum"] != _checksum(genes):
            raise ValueError(f"genome checksum {data['checksum']!r} does not match its genes (tampered or "
                             f"hand-edited; write genomes with to_json).")
        return Genome(**{**genes, "attention": tuple(genes["attention"]),
                         "full_attention": tuple(genes["full_attention"])})

    def describe(self, candidate: Genome) -> str:
        """A per-layer table: layer, method gene, MASFormer flag, the method run (inert layers marked)."""
        head_dim = candidate.embed_dim // candidate.num_heads
        lines = [f"decoder_lm  embed {candidate.embed_dim}, {candidate.num_layers} layers, {candidate.num_heads} "
                 f"heads of {head_dim}, mlp {self.mlp_dim(candidate)} (x{candidate.mlp_ratio})  "
                 f"key {self.key(candidate)}",
                 f"{'layer':>5}  {'method gene':<20} {'full':<5} runs"]
        for i, (method, full) in enumerate(zip(candidate.attention, candidate.full_attention, strict=True)):
            runs = "(inert)" if i >= candidate.num_layers else self.full_attention if full else method
            lines.append(f"{i:>5}  {method:<20} {'yes' if full else '-':<5} {runs}")
        return "\n".join(lines)
