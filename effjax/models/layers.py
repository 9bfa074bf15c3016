"""Transformer building blocks shared by every model family, with logical axis names on params."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effjax import attention as attention_lib
from effjax.attention.decoding import token_positions
from effjax.attention.softmax import repeat_kv
from effjax.models import layer_attention
from effjax.models.distil import Distil
from effjax.models.norms import Norm, PRepBNSchedule, check_norm, check_norm_layout
from effjax.models.positions import ADDITIVE, apply_rotary, check_position, sinusoid_rows, sinusoid_table
from effjax.search import program as search_program
from effjax.search.interpreter import ProgramBlock
from effjax.tokens import flops as token_flops
from effjax.tokens import plan as token_plan
from effjax.tokens import stats as token_stats
from effjax.tokens.state import TokenState

Dtype = Any

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def logical(init, axes):
    """An initializer whose parameter carries logical axis names for sharding."""
    return nn.with_logical_partitioning(init, axes)


def squared_relu(x):
    """relu(x)^2, Primer's MLP activation (So et al. 2021, Sec. 3)."""
    return jnp.square(nn.relu(x))


def gelu_exact(x):
    """The erf form of GELU (Hendrycks & Gimpel 2016), as PyTorch's ``nn.GELU()`` and timm compute it; ``gelu``
    is flax's tanh approximation."""
    return nn.gelu(x, approximate=False)


ACTIVATIONS = {"gelu": nn.gelu, "gelu_exact": gelu_exact, "relu": nn.relu, "silu": nn.silu,
               "squared_relu": squared_relu}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]


class MultiHeadAttention(nn.Module):
    """Q/K/V/O projections around a registered attention method.

    Projections are ``self.param`` tensors of shape (embed, heads, head_dim) contracted with einsum,
    because linen's DenseGeneral with logically partitioned kernels fails under a mesh. Only those the method
    asks for are made (``attention.projections``); without ``key`` the method receives ``k = q``. ``use_bias`` adds
    ``query_bias``/``key_bias``/``value_bias`` [heads, head_dim] and ``out_bias`` [embed] (timm's ViT has them).
    ``key_bias`` [batch, kv_len] is added to every query's logits (proportional attention's ``log sizes``);
    a method that does not declare the ``key_bias`` capability refuses it. ``with_stats`` returns
    ``(y, AttentionStats)`` for token reduction. ``rotary`` rotates q and k by their token index (RoFormer,
    ``positions.apply_rotary``) before the method sees them. ``num_kv_heads`` (0: ``num_heads``) projects keys and
    values to fewer heads (grouped-query attention; 1: multi-query): a method that declares ``grouped_kv`` gets them
    as they are, any other one copies per query head (``softmax.repeat_kv``). ``cache`` makes it a decoding call of
    the method (``effjax.attention.decoding``: a prefill, or a step at ``positions [batch]``) and returns
    ``(y, cache)``.
    """

    num_heads: int
    head_dim: int
    attention: str = "softmax"
    attention_params: dict | None = None
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    rotary: bool = False
    num_kv_heads: int = 0

    @nn.compact
    def __call__(self, x, *, mask=None, segment_ids=None, causal=False, deterministic=True, key_bias=None,
                 with_stats=False, cache=None, positions=None):
        embed = x.shape[-1]
        kv_heads = check_kv_heads(self.num_heads, self.num_kv_heads)
        params = self.attention_params or {}
        projected = {}
        for name in attention_lib.projections(self.attention, params):
            heads, heads_axis = (kv_heads, KV_HEADS_AXIS) if name != "query" and kv_heads != self.num_heads else (
                self.num_heads, "heads")
            w = self.param(name, logical(dense_init, ("embed", heads_axis, "head_dim")), (embed, heads, self.head_dim),
                           jnp.float32)
            y = jnp.einsum("ble,ehd->blhd", x, w.astype(self.dtype))
            if self.use_bias:
                y = y + self.param(f"{name}_bias", logical(nn.initializers.zeros, (heads_axis, "head_dim")),
                                   (heads, self.head_dim), jnp.float32).astype(self.dtype)
            projected[name] = nn.with_logical_constraint(y, ("batch", "length", heads_axis, "head_dim"))
        if self.rotary:
            check_rotary(self.attention, projected)
            length = projected["query"].shape[1]
            index = None if positions is None else token_positions(positions, length)  # a step or extend
            projected = {name: apply_rotary(y, index) if name != "value" else y for name, y in projected.items()}
        # A method without a key projection makes its keys from q itself (Primer's shared Q/K representation).
        qkv = [projected["query"], projected.get("key", projected["query"]), projected["value"]]
        if not attention_lib.capabilities(self.attention).grouped_kv:
            qkv = [repeat_kv(x, self.num_heads) for x in qkv]
        method = attention_lib.make(self.attention, **params)
        extra = {}
        if key_bias is not None:
            check_key_bias(self.attention)
            extra["key_bias"] = key_bias
        if cache is not None:
            check_decodes(self.attention)
            extra.update(cache=cache, positions=positions)
        y = method(*qkv, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic, **extra)
        if cache is not None:
            y, cache = y
        w_out = self.param("out", logical(dense_init, ("heads", "head_dim", "embed")),
                           (self.num_heads, self.head_dim, embed), jnp.float32)
        y = jnp.einsum("blhd,hde->ble", y.astype(self.dtype), w_out.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("out_bias", logical(nn.initializers.zeros, ("embed",)), (embed,),
                               jnp.float32).astype(self.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        if cache is not None:
            return y, cache
        if not with_stats:
            return y
        qkv = [repeat_kv(x, self.num_heads) for x in qkv]
        return y, token_stats.AttentionStats(*qkv, key_bias=key_bias, mask=mask, method=self.attention)


def check_rotary(method: str, projected: dict) -> None:
    """ValueError when attention ``method`` makes its keys from q itself: rotating that shared representation
    before the method's own mixing would not give RoFormer's relative scores."""
    if "key" not in projected:
        raise ValueError(f"model.position='rotary' rotates q and k before the attention method, but {method!r} "
                         f"(with these params) makes its keys from q itself (no key projection, e.g. primer_mdha "
                         f"share_qk=True): use model.position='learned' or 'sinusoid', or a key projection.")


KV_HEADS_AXIS = "kv_heads"  # the logical axis of grouped key/value heads (no rule by default: replicated)


def check_kv_heads(num_heads: int, num_kv_heads: int) -> int:
    """The number of key/value heads (``num_kv_heads``, 0 meaning ``num_heads``); ValueError unless it divides
    ``num_heads``."""
    if num_kv_heads == 0:
        return num_heads
    if not (isinstance(num_kv_heads, int) and 0 < num_kv_heads <= num_heads and num_heads % num_kv_heads == 0):
        raise ValueError(f"model.num_kv_heads={num_kv_heads!r} must divide model.num_heads={num_heads} (1: multi-query "
                         f"attention; 0: one kv head per query head).")
    return num_kv_heads


def check_decodes(method: str) -> None:
    """NotImplementedError naming attention ``method`` when it has no cached or recurrent decoding."""
    if not attention_lib.capabilities(method).decode:
        why = attention_lib.no_decode_reason(method)
        raise NotImplementedError(f"{method}: decoding is not supported: {why}; methods that decode: "
                                  f"{', '.join(attention_lib.supporting('decode'))}.")


def check_key_bias(method: str) -> None:
    """ValueError when attention ``method`` cannot add a per-key logit bias (proportional attention)."""
    if not attention_lib.capabilities(method).key_bias:
        takers = ", ".join(attention_lib.supporting("key_bias"))
        raise ValueError(f"Attention method {method!r} cannot take a key bias, which proportional attention "
                         f"(model.tokens.prop_attn) adds as log(token sizes): set model.tokens.prop_attn=False "
                         f"or use a method that takes one ({takers}) on the reduced layers.")


class Mlp(nn.Module):
    """Position-wise feed-forward block: Dense -> activation -> dropout -> Dense."""

    mlp_dim: int
    dropout_rate: float = 0.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        embed = x.shape[-1]
        act = activation_fn(self.activation)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=logical(dense_init, ("embed", "mlp")),
                     bias_init=logical(nn.initializers.zeros, ("mlp",)), name="wi")(x)
        h = nn.with_logical_constraint(act(h), ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(embed, dtype=self.dtype, kernel_init=logical(dense_init, ("mlp", "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)), name="wo")(h)


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

    ``norm_layout='pre_post'`` (full Primer's PrePostNormLayerStack, So et al. 2021) keeps the attention sublayer
    pre-norm and normalises the MLP's output inside its residual branch: x + MLP(x) becomes x + Norm(MLP(x)). The
    norms keep their names (``ln_attention``, ``ln_mlp``) in both layouts.

    ``reduction`` (a ``effjax.tokens.plan.Step`` whose method sits at place 'attention') reduces the tokens
    between the attention residual and the MLP, as ToMe does; ``tokens`` is then the ``TokenState`` of ``x``
    and ``prop_attn`` adds ``log(sizes)`` to the attention logits. Returns ``(x, tokens)``; with a decoding
    ``cache`` (``MultiHeadAttention``) ``(x, cache)``.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    attention: str = "softmax"
    attention_params: dict | None = None
    dropout_rate: float = 0.0
    activation: str = "gelu"
    norm: str = "layernorm"
    dtype: Dtype = jnp.float32
    qkv_bias: bool = False
    reduction: Any = None
    prop_attn: bool = False
    norm_eps: float = 1e-6
    norm_layout: str = "pre"
    rotary: bool = False
    num_kv_heads: int = 0

    @nn.compact
    def __call__(self, x, *, mask=None, segment_ids=None, causal=False, deterministic=True, gamma=None,
                 tokens=None, cache=None, positions=None):
        check_norm_layout(self.norm_layout)
        if tokens is not None:
            mask = tokens.mask
        norm = dict(mask=mask, gamma=gamma, deterministic=deterministic)
        h = Norm(self.norm, self.dtype, self.norm_eps, name="ln_attention")(x, **norm)
        key_bias = tokens.log_sizes() if tokens is not None and self.prop_attn else None
        attention = MultiHeadAttention(self.num_heads, self.head_dim, self.attention, self.attention_params,
                                       self.dtype, self.qkv_bias, self.rotary, self.num_kv_heads, name="attention")
        if cache is not None:
            h, cache = attention(h, mask=mask, causal=causal, deterministic=deterministic, cache=cache,
                                 positions=positions)
        else:
            h, stats = attention(h, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic,
                                 key_bias=key_bias, with_stats=True)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        if self.reduction is not None:
            x, tokens = self.reduction.apply_to(x, tokens, stats, deterministic=deterministic)
            norm["mask"] = tokens.mask
        mlp = Mlp(self.mlp_dim, self.dropout_rate, self.activation, self.dtype, name="mlp")
        ln_mlp = Norm(self.norm, self.dtype, self.norm_eps, name="ln_mlp")
        if self.norm_layout == "pre_post":
            h = ln_mlp(mlp(x, deterministic=deterministic), **norm)
        else:
            h = mlp(ln_mlp(x, **norm), deterministic=deterministic)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), tokens if cache is None else cache


def distil_after_prefix(distil, x, mask, prefix_tokens: int, deterministic: bool):
    """Applies ``distil`` to the tokens after the first ``prefix_tokens`` (e.g. CLS), which pass unchanged."""
    prefix, rest = x[:, :prefix_tokens], x[:, prefix_tokens:]
    rest_mask = None if mask is None else mask[:, prefix_tokens:]
    rest, rest_mask = distil(rest, rest_mask, deterministic=deterministic)
    x = jnp.concatenate([prefix, rest.astype(x.dtype)], axis=1)
    if mask is not None:
        mask = jnp.concatenate([mask[:, :prefix_tokens], rest_mask], axis=1)
    return x, mask


class Backbone(nn.Module):
    """The fields every model family shares, and the stack of blocks they configure.

    ``attention`` is one method name or a per-layer tuple; ``full_attention_layers`` (MASFormer, Zhang et
    al. 2023) lists layer indices that use ``full_attention`` instead. ``norm`` is 'layernorm', 'primer' (Primer's
    norm) or 'prepbn'; ``norm_layout`` is 'pre' or 'pre_post' (full Primer: the MLP's norm on its output, ``Block``).
    ``distil`` puts Informer's distilling layer (Zhou et al. 2021, Sec. 3.2) between blocks, halving the length.
    ``attention_impl`` ("xla" | "pallas") is the ``impl`` of every layer whose method has a Pallas kernel
    path, unless the method's own params set one; layers whose method has none run XLA.
    ``qkv_bias`` gives the attention projections biases; ``num_kv_heads`` (0: ``num_heads``) shares each key/value
    head among ``num_heads / num_kv_heads`` query heads (grouped-query attention; 1: multi-query); ``norm_eps`` is
    LayerNorm's epsilon.
    ``position`` (``effjax.models.positions``): 'learned' | 'sinusoid' are added to the embeddings by ``Trunk``,
    'rotary' rotates q and k of every layer by token index (packed segments included: the index runs on across
    segments, and rotary scores depend on index differences only), 'none' adds nothing. A family embedding
    tokens itself (ViT) keeps its own learned table and accepts only 'learned'.
    ``tokens`` (``model.tokens``: method, schedule, ``prop_attn``, params) reduces the tokens inside the block
    loop (``effjax.tokens``); prefix tokens are kept. ``program`` (``effjax.search.program``: a Program, its JSON
    object or text, or a .json file) replaces every block by that program (causal by construction).
    """

    num_layers: int = 4
    embed_dim: int = 512
    num_heads: int = 8
    mlp_dim: int = 1024
    attention: Any = "softmax"
    attention_params: dict | None = None
    attention_dropout_rate: float = 0.0
    attention_impl: str = "xla"
    full_attention_layers: tuple = ()
    full_attention: str = "softmax"
    dropout_rate: float = 0.1
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_layout: str = "pre"
    prepbn_steps: int = 60000
    prepbn_warmup: int = 0
    distil: bool = False
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    tokens: dict | None = None
    program: Any = None
    dtype: Dtype = jnp.float32
    position: str = "learned"
    num_kv_heads: int = 0

    def layer_attention(self) -> tuple[tuple[str, dict], ...]:
        """``((method, params), ...)`` per layer, resolved from this model's attention fields."""
        return layer_attention.resolve({name: getattr(self, name) for name in layer_attention.FIELDS})

    def token_plan(self, num_tokens: int, prefix_tokens: int, *, causal=False, segment_ids=None):
        """The static ``effjax.tokens.plan.Plan`` of ``model.tokens`` for ``num_tokens`` tokens, or None (off)."""
        methods = tuple(method for method, _ in self.layer_attention())
        found = token_plan.plan(self.tokens, num_layers=self.num_layers, num_tokens=num_tokens,
                                prefix=prefix_tokens, layer_methods=methods)
        if found is not None and (causal or segment_ids is not None or self.distil):
            raise ValueError("model.tokens reduces tokens by content across the whole sequence: it cannot be "
                             "causal, keep packed segments apart or follow model.distil; use it in encoders.")
        return found

    def check_position(self, *, embeds_positions: bool, reduces_tokens: bool) -> None:
        """ValueError for a ``position`` this model cannot honour (rather than silently ignoring it)."""
        check_position(self.position)
        if not embeds_positions and self.position != "learned":
            raise ValueError(f"model.position={self.position!r} is for the token models (encoder_classifier, "
                             f"decoder_lm); this family adds its own learned position table: use 'learned'.")
        if self.position == "rotary" and (reduces_tokens or self.program):
            raise ValueError("model.position='rotary' rotates q and k by token index, which model.tokens (merged "
                             "tokens have no one index) and model.program (its own attention) cannot honour; "
                             "use 'learned' or 'sinusoid'.")

    def blocks(self, x, *, mask=None, segment_ids=None, causal=False, deterministic=True, prefix_tokens=0,
               with_tokens=False, fixed_macs=0, embeds_positions=False, cache=None, positions=None):
        """The blocks and the final norm over embedded ``x [batch, length, embed]``; returns ``(x, mask)``.

        With ``distil`` the length (after the ``prefix_tokens``, which are kept) halves between blocks,
        and so does the returned key-padding ``mask``. With ``model.tokens`` the length shrinks by the schedule;
        ``with_tokens`` returns ``(x, mask, TokenState)`` (sizes for size-weighted pooling, the source map), and
        the final ``source`` and ``sizes`` are also sown into the ``intermediates`` collection, with
        ``token_gmacs``: the model's analytic GMACs under the reduction (``effjax.tokens.flops.block_macs`` per
        block on the tokens it computes on, plus ``fixed_macs``, the caller's patch embedding and head). With
        ``model.tokens.flops_target`` the loss ``flops_weight * (token_gmacs - flops_target)^2`` is sown into
        ``losses`` when training (not ``deterministic``), which the train step adds. ``embeds_positions``: the
        caller (``Trunk``) has applied ``position``'s additive part, so every value of it is honoured.
        ``cache`` (``init_cache``): a decoding call (``effjax.attention.decoding``; a prefill, or one step at
        ``positions [batch]``), returns ``(x, mask, cache)``.
        """
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads "
                             f"{self.num_heads}.")
        check_norm(self.norm)
        check_norm_layout(self.norm_layout)
        if self.norm == "prepbn" and causal:
            raise ValueError("model.norm='prepbn' cannot be causal: BatchNorm statistics over the batch and "
                             "length mix future tokens into every prediction; use 'layernorm'.")
        if self.distil and (causal or segment_ids is not None):
            raise ValueError("model.distil halves the sequence with a two-sided conv and pooling: it cannot be "
                             "causal or keep packed segments apart; use it in encoders only.")
        plan = self.token_plan(x.shape[1], prefix_tokens, causal=causal, segment_ids=segment_ids)
        self.check_position(embeds_positions=embeds_positions, reduces_tokens=plan is not None)
        tokens = None if plan is None else TokenState.start(x.shape[0], x.shape[1], mask)
        gamma = PRepBNSchedule(self.norm, self.prepbn_steps, self.prepbn_warmup, name="prepbn_schedule")(
            deterministic=deterministic)
        head_dim = self.embed_dim // self.num_heads
        layers = self.layer_attention()
        macs = fixed_macs
        program = search_program.load(self.program) if self.program else None
        if program is not None and (plan is not None or self.distil or self.norm != "layernorm"
                                    or self.norm_layout != "pre"):
            raise ValueError("model.program replaces every block, so model.tokens, model.distil, a model.norm "
                             "other than 'layernorm' and model.norm_layout='pre_post' cannot act inside it; unset "
                             "them or model.program.")
        if cache is not None:
            self.check_decoding(plan, program)
            new_cache = {}
        for i, (method, params) in enumerate(layers):
            if cache is not None:
                x, new_cache[f"block_{i}"] = Block(
                    self.num_heads, head_dim, self.mlp_dim, method, params, self.dropout_rate, self.activation,
                    self.norm, self.dtype, self.qkv_bias, None, False, self.norm_eps, self.norm_layout,
                    self.position == "rotary", self.num_kv_heads, name=f"block_{i}")(
                    x, mask=mask, causal=causal, deterministic=deterministic, gamma=gamma, cache=cache[f"block_{i}"],
                    positions=positions)
                continue
            if program is not None:
                x = ProgramBlock(program, name=f"block_{i}")(x)
                continue
            step = None if plan is None else plan.step(i)
            if step is not None and step.place == "block":
                x, tokens = step.apply_to(x, tokens, None, deterministic=deterministic, name=f"tokens_{i}")
                step = None
            entering = None if tokens is None else tokens.real_count()
            x, tokens = Block(self.num_heads, head_dim, self.mlp_dim, method, params, self.dropout_rate,
                              self.activation, self.norm, self.dtype, self.qkv_bias, step,
                              plan is not None and plan.prop_attn, self.norm_eps, self.norm_layout,
                              self.position == "rotary", self.num_kv_heads, name=f"block_{i}")(
                x, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic, gamma=gamma,
                tokens=tokens)
            if tokens is not None:
                macs = macs + token_flops.block_macs(entering, tokens.real_count(), self.embed_dim, self.mlp_dim)
            if self.distil and i < len(layers) - 1:
                x, mask = distil_after_prefix(Distil(name=f"distil_{i}"), x, mask, prefix_tokens, deterministic)
        if tokens is not None:
            mask = tokens.mask
            self.sow("intermediates", "token_source", tokens.source)
            self.sow("intermediates", "token_sizes", tokens.sizes)
            gmacs = jnp.asarray(macs, jnp.float32) / 1e9
            self.sow("intermediates", "token_gmacs", gmacs)
            if plan.flops_target is not None and not deterministic:  # the train step adds it (DiffRate Sec. 3.3)
                self.sow("losses", "tokens_flops", plan.flops_loss(gmacs))
        x = Norm(self.norm, self.dtype, self.norm_eps, name="ln_final")(x, mask=mask, gamma=gamma,
                                                                      deterministic=deterministic)
        if cache is not None:
            return x, mask, new_cache
        return (x, mask, tokens) if with_tokens else (x, mask)

    def check_decoding(self, plan, program) -> None:
        """ValueError for model settings a decoding call cannot honour, naming the fix."""
        if plan is not None or program is not None or self.distil:
            raise ValueError("Decoding runs the attention blocks one token at a time: model.tokens, model.program "
                             "and model.distil act on the whole sequence and cannot decode; unset them.")

    @nn.nowrap
    def init_cache(self, batch: int, max_length: int) -> dict:
        """The empty decoding cache of every layer, ``{'block_i': cache}`` with logically partitioned leaves
        (``effjax.attention.decoding``); refuses a layer whose method cannot decode, naming it."""
        head_dim = self.embed_dim // self.num_heads
        kv_heads = check_kv_heads(self.num_heads, self.num_kv_heads)
        caches = {}
        for i, (method, params) in enumerate(self.layer_attention()):
            check_decodes(method)
            module = attention_lib.make(method, **params)
            if kv_heads != self.num_heads and attention_lib.capabilities(method).grouped_kv:
                caches[f"block_{i}"] = jax.tree.map(  # the cache holds the kv heads only, on their own logical axis
                    lambda box: box.replace(names=tuple(KV_HEADS_AXIS if n == "heads" else n for n in box.names)),
                    module.init_cache(batch, max_length, kv_heads, head_dim, self.dtype),
                    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
            else:
                caches[f"block_{i}"] = module.init_cache(batch, max_length, self.num_heads, head_dim, self.dtype)
        return caches

    def backbone_fields(self) -> dict:
        return {name: getattr(self, name) for name in Backbone.__dataclass_fields__
                if name not in ("parent", "name")}


class Trunk(Backbone, kw_only=True):
    """Token embeddings (and ``prefix_tokens`` learned vectors, e.g. CLS), the ``position`` encoding, the blocks.

    'learned' adds the trained ``pos_embed`` table, 'sinusoid' the fixed one (``positions.sinusoid_table``);
    both cover the prefix tokens, which take positions 0..prefix_tokens-1. 'rotary' and 'none' add nothing here.
    Returns ``(x, mask)``: the final states and their key-padding mask (shorter than the input with ``distil``).
    ``cache`` and ``positions``: a decoding call (``Backbone.blocks``); a step's or extend's tokens take their
    positions from ``positions [batch]`` (each row's first) on, and it returns ``(x, mask, cache)``.
    """

    vocab_size: int
    max_length: int
    prefix_tokens: int = 0

    @nn.compact
    def __call__(self, tokens, *, mask=None, segment_ids=None, causal=False, deterministic=True, cache=None,
                 positions=None):
        check_position(self.position)
        batch, length = tokens.shape
        if cache is not None and self.prefix_tokens:
            raise ValueError("Decoding a model with prefix tokens (CLS) is not supported: they have no place in a "
                             "left-to-right cache.")
        if length > self.max_length:
            raise ValueError(
                f"Sequence length {length} exceeds the model's maximum {self.max_length} "
                "(config.model.max_length): raise it or shorten the data (config.data.max_length).")
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=logical(embed_init, ("vocab", "embed")),
                     name="token_embed")(tokens)
        total = length + self.prefix_tokens
        if self.position == "learned":
            pos = self.param("pos_embed", logical(embed_init, ("length", "embed")),
                             (self.max_length + self.prefix_tokens, self.embed_dim), jnp.float32)
        elif self.position == "sinusoid":
            pos = jnp.asarray(sinusoid_table(total, self.embed_dim))
        if self.prefix_tokens:
            prefix = self.param("prefix_embed", logical(embed_init, ("prefix", "embed")),
                                (self.prefix_tokens, self.embed_dim), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (batch, *prefix.shape)), x], axis=1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((batch, self.prefix_tokens), bool), mask], axis=1)
        if self.position in ADDITIVE and positions is not None:  # a decoding call: each token's own position
            index = token_positions(positions, x.shape[1])  # a chunk's pads may run past max_length: clipped
            x = x + (jnp.take(pos, index, axis=0, mode="clip") if self.position == "learned" else
                     sinusoid_rows(index, self.embed_dim))
        elif self.position in ADDITIVE:
            x = x + pos[None, :total]
        x = x.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return self.blocks(x, mask=mask, segment_ids=segment_ids, causal=causal, deterministic=deterministic,
                           prefix_tokens=self.prefix_tokens, embeds_positions=True, cache=cache, positions=positions)
