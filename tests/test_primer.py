"""Full Primer (So et al. 2021): Primer's norm against float64, the pre/post-norm layout against a hand-composed
block, shared Q/K attention against a naive reference (and without a key projection), the program equal to the
built-in block, the config trains with no future leak in its decoder, and a bad layout is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import lm_bytes
from effjax import attention, models
from effjax.attention import primer_mdha
from effjax.models.layers import Block, Mlp, MultiHeadAttention
from effjax.models.norms import Norm
from effjax.search import interpreter, seeds
from effjax.train import tasks, trainer
from effjax.train.validate import validate

EMBED, HEADS, MLP = 32, 2, 64  # the program's widths: relative dims 8, 32, 16 x embed_dim / 16


def random_variables(module, *args, seed=0, **kwargs):
    """``module``'s variables drawn by numpy (shapes from ``jax.eval_shape``: nothing compiles): norm scales
    1 + 0.2 N(0, 1), other vectors 0.2 N(0, 1), arrays N(0, 1) / sqrt(their first dim), so no weight hides behind
    its init value."""
    shapes = nn.meta.unbox(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if len(leaf.shape) < 2:
            return jnp.asarray((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0) + 0.2 * noise)
        return jnp.asarray(noise / np.sqrt(leaf.shape[0]))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def norm64(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt((x * (x - mean)).mean(-1, keepdims=True) + eps) * scale + bias


def test_primer_norm_matches_float64_and_layer_norm():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 8, EMBED))
    module = Norm("primer")
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]["primer_norm"]
    assert set(boxed) == {"scale", "bias"} and boxed["scale"].names == boxed["bias"].names == ("embed",)
    variables = random_variables(module, x)
    params = variables["params"]["primer_norm"]
    got = module.apply(variables, x)
    np.testing.assert_allclose(got, norm64(x, params["scale"], params["bias"]), rtol=1e-5, atol=1e-5)
    layer_norm = nn.LayerNorm(epsilon=1e-6).apply({"params": params}, x)
    np.testing.assert_allclose(got, layer_norm, rtol=1e-5, atol=1e-5)


def test_pre_post_layout_is_x_plus_norm_of_the_mlp_output():
    x = jax.random.normal(jax.random.key(0), (2, 8, EMBED))
    block = Block(num_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP, activation="relu", norm_layout="pre_post")
    variables = random_variables(block, x, causal=True)
    pre = Block(num_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP, activation="relu")
    assert jax.tree.structure(variables) == jax.tree.structure(random_variables(pre, x, causal=True))
    got, _ = block.apply(variables, x, causal=True)
    p = variables["params"]

    def ln(name, z):
        return jnp.asarray(norm64(z, p[name]["layer_norm"]["scale"], p[name]["layer_norm"]["bias"]), jnp.float32)

    h = x + MultiHeadAttention(HEADS, EMBED // HEADS).apply({"params": p["attention"]}, ln("ln_attention", x),
                                                            causal=True)
    expected = h + ln("ln_mlp", Mlp(MLP, activation="relu").apply({"params": p["mlp"]}, h))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    assert not np.allclose(got, pre.apply(variables, x, causal=True)[0], atol=1e-3)


def naive_shared_qk(r, v, qk_kernel, v_kernel, q_solo, mask):
    """float64 loops: padded positions zeroed, causal width-3 convs, Q = r' q_solo, causal masked softmax."""
    r, v, qk_kernel, v_kernel, q_solo = (np.asarray(a, np.float64) for a in (r, v, qk_kernel, v_kernel, q_solo))
    real = np.asarray(mask)[:, :, None, None]
    r, v = r * real, v * real
    length = r.shape[1]

    def dconv(x, kernel):
        return np.stack([sum(kernel[s] * x[:, t - s] for s in range(3) if t - s >= 0) for t in range(length)], 1)

    k, vc = dconv(r, qk_kernel), dconv(v, v_kernel)
    q = np.einsum("blhd,hdge->blge", k, q_solo)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.tril(np.ones((length, length), bool))[None, None] & np.asarray(mask)[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, vc)


def test_shared_qk_attention_against_a_naive_reference_and_without_a_key_projection():
    b, length, h, d = 2, 8, HEADS, EMBED // HEADS
    r, v = jax.random.normal(jax.random.key(0), (2, b, length, h, d))
    mask = jnp.array([[True] * length, [True] * 6 + [False] * 2])
    module = primer_mdha.Attention(share_qk=True)
    variables = random_variables(module, r, r, v, causal=True)
    params = variables["params"]
    assert {k: p.shape for k, p in params.items()} == {
        "qk_dconv": (3, h, d), "v_dconv": (3, h, d), "q_solo": (h, d, h, d)}
    got = module.apply(variables, r, r, v, mask=mask, causal=True)
    expected = naive_shared_qk(r, v, params["qk_dconv"], params["v_dconv"], params["q_solo"], mask)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, :6], expected[1, :6], rtol=1e-5, atol=1e-5)  # the real tokens
    # With an identity q_solo, masks and segments act exactly as in the unshared path with q = k = r.
    identity = jnp.eye(h * d).reshape(h, d, h, d)
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 0, 0]])
    for options in ({"mask": mask, "causal": True}, {"mask": mask, "segment_ids": segments}):
        shared = primer_mdha.attend_shared_qk(r, v, params["qk_dconv"], params["v_dconv"], identity, **options)
        plain = primer_mdha.attend(r, r, v, params["qk_dconv"], params["qk_dconv"], params["v_dconv"], **options)
        np.testing.assert_allclose(shared, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="primer_mdha: share_qk=True makes K from q"):
        module.apply(variables, r, r[:, :5], v[:, :5])
    x = jnp.zeros((b, length, EMBED))
    made = jax.eval_shape(MultiHeadAttention(h, d, "primer_mdha", {"share_qk": True}).init, jax.random.key(0), x)
    assert set(made["params"]) == {"query", "value", "out", "Attention_0"}
    assert attention.projections("primer_mdha", {"share_qk": True}) == ("query", "value")
    assert attention.projections("primer_mdha") == attention.projections("softmax") == ("query", "key", "value")


def test_the_primer_program_equals_the_built_in_block_with_a_per_head_q_solo():
    block = Block(num_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP, attention="primer_mdha",
                  attention_params={"share_qk": True}, activation="squared_relu", norm="primer",
                  norm_layout="pre_post")
    x = jax.random.normal(jax.random.key(1), (2, 8, EMBED))
    variables = random_variables(block, x, causal=True)
    convs = variables["params"]["attention"]["Attention_0"]
    with pytest.raises(ValueError, match="q_solo mixes heads"):
        seeds.params_from_block(variables["params"], primer=True)
    convs["q_solo"] = convs["q_solo"] * jnp.eye(HEADS)[:, None, :, None]  # block-diagonal: zero across heads
    expected, _ = block.apply(variables, x, causal=True)
    params = seeds.params_from_block(variables["params"], primer=True)
    got = interpreter.ProgramBlock(seeds.primer(EMBED, HEADS, MLP)).apply({"params": params}, x)
    print(f"program vs block max abs difference: {float(jnp.abs(got - expected).max()):.2e}")
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_the_primer_config_trains_and_its_decoder_never_reads_a_later_token():
    config = lm_bytes.get_config("primer,smoke")
    assert lm_bytes.get_config("smoke,primer").to_dict() == config.to_dict()
    fields = config.model
    assert (fields.attention, fields.activation, fields.norm, fields.norm_layout) == (
        "primer_mdha", "squared_relu", "primer", "pre_post")
    assert fields.attention_params.primer_mdha.share_qk
    validate(config, process_count=1, batch_shards=1)
    config.data.max_files = 4
    source, _ = trainer.data_sources(config)
    model = models.build(fields.name, vocab_size=source.vocab_size, num_classes=None,
                         **{k: v for k, v in fields.to_dict().items() if k != "name"})
    inputs = jnp.asarray(np.stack([source[i]["inputs"] for i in range(4)]))
    params = random_variables(model, inputs)["params"]
    block = params["trunk"]["block_0"]
    assert "key" not in block["attention"] and "primer_norm" in block["ln_mlp"]
    tx = optax.sgd(config.learning_rate)

    @jax.jit
    def step(params, opt_state, inputs):  # one compile serves the training and the leak check
        def objective(p):
            logits = model.apply({"params": p}, inputs)
            return tasks.lm(logits, {"inputs": inputs})[0], logits

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, logits

    opt_state, losses = tx.init(params), []
    for _ in range(2):
        new_params, new_opt_state, loss, before = step(params, opt_state, inputs)
        changed = inputs.at[:, 9].set(inputs[:, 9] % 200 + 1)  # a later token changes no earlier logit
        after = step(params, opt_state, changed)[3]
        np.testing.assert_array_equal(before[:, :9], after[:, :9])
        assert np.abs(before[:, 9:] - after[:, 9:]).max() > 1e-4
        params, opt_state = new_params, new_opt_state
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses


def test_a_bad_norm_layout_and_a_pre_post_program_are_refused_in_one_line():
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError) as error:
        Block(num_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP, norm_layout="post").init(
            jax.random.key(0), jnp.zeros((1, 4, EMBED)))
    assert str(error.value) == "model.norm_layout must be one of pre, pre_post, got 'post'."
    program = seeds.primer(EMBED, HEADS, MLP)
    with pytest.raises(ValueError, match="model.norm_layout='pre_post' cannot act inside it"):
        jax.eval_shape(models.build("decoder_lm", vocab_size=40, num_classes=None, embed_dim=EMBED, num_heads=HEADS,
                                    mlp_dim=MLP, norm_layout="pre_post", program=program).init,
                       jax.random.key(0), tokens)
