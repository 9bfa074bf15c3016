"""Programs (Primer-style search space): the seed and Primer-EZ programs equal the hand-written blocks, JSON
round trips exactly and refuses damage, the canonical key ignores dead code, mutations always give valid
programs, every primitive runs forward and backward, and no program sees the future."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import slow_after

from effjax import models
from effjax.models.layers import Block
from effjax.search import interpreter, program_space, seeds
from effjax.search import primitives as prims
from effjax.search import program as program_lib
from effjax.search.program import Instruction, Program

EMBED, HEADS, MLP = 32, 2, 128


@pytest.mark.parametrize("ez", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["vanilla", "primer_ez"])
def test_reference_programs_equal_the_hand_written_blocks(ez):
    block = Block(num_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP, attention="primer_mdha" if ez else "softmax",
                  activation="squared_relu" if ez else "relu")
    x = jax.random.normal(jax.random.key(1), (2, 10, EMBED))
    variables = nn.meta.unbox(block.init(jax.random.key(0), x, causal=True))
    # Random dconv kernels and LayerNorm affine terms, so a mis-mapped weight cannot hide behind an init value.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(jax.random.key(hash(jax.tree_util.keystr(path)) % 2**31),
                                                    a.shape), variables)
    expected, _ = block.apply(variables, x, causal=True)
    program = seeds.primer_ez(EMBED, HEADS, MLP) if ez else seeds.vanilla(EMBED, HEADS, MLP)
    params = seeds.params_from_block(variables["params"], dconv=ez, squared=ez)
    got = interpreter.ProgramBlock(program).apply({"params": params}, x)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_json_round_trip_is_exact_and_damage_is_refused_in_one_line():
    program = seeds.primer_ez(EMBED, HEADS, MLP)
    data = program_lib.to_json(program)
    assert program_lib.from_json(json.dumps(data)) == program
    assert program_lib.to_json(program_lib.from_json(data)) == data
    tampered = json.loads(json.dumps(data))
    tampered["subprograms"][3][1]["op"] = "square"
    bad_op = {**json.loads(json.dumps(data)), "subprograms": [[{"op": "frobnicate"}]]}
    cases = [(tampered, "checksum does not match"), (bad_op, "Unknown program primitive 'frobnicate'"),
             ({"format": "other"}, "Not an effjax program"), ("{not json", "does not parse"),
             ({**data, "subprograms": None}, "Malformed program JSON")]
    for value, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            program_lib.from_json(value)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="must call a later subprogram"):
        Program(((Instruction("call:0"),),))


def test_the_key_ignores_dead_code_and_unread_fields_but_not_live_changes():
    program = seeds.vanilla(EMBED, HEADS, MLP)
    key = program_lib.key(program)
    block = program.subprograms[0]
    dead = dataclasses.replace(program, subprograms=(block + (Instruction("exp", 2),),) + program.subprograms[1:])
    assert program_lib.key(dead) != key  # the new last state is the output: live
    dead = dataclasses.replace(program, subprograms=((block[0], Instruction("exp", 1)) + tuple(
        dataclasses.replace(ins, in1=ins.in1 + (ins.in1 >= 2), in2=ins.in2 + (ins.in2 >= 2)) for ins in block[1:]),)
        + program.subprograms[1:])
    assert program_lib.key(dead) == key  # an unread exp in the middle is dead
    relu_const = dataclasses.replace(program.subprograms[3][1], const=0, in2=3)  # relu reads neither
    unread = dataclasses.replace(program, subprograms=program.subprograms[:3] + (
        (program.subprograms[3][0], relu_const, program.subprograms[3][2]),))
    assert program_lib.key(unread) == key
    live = dataclasses.replace(program, constants=(0.5,))  # the attention scale is read
    assert program_lib.key(live) != key
    assert "# dead" in program_lib.listing(dead) and "def s2(h0, h1):" in program_lib.listing(program)


@pytest.mark.parametrize("count", slow_after([600, 2000]))
def test_many_random_mutations_give_valid_programs_that_round_trip(count):
    space = program_space.make("full", embed_dim=EMBED, num_heads=HEADS, mlp_dim=MLP)
    rng = np.random.default_rng(count)
    program = space.seed
    seen, same = set(), 0
    for step in range(count):
        child, how = space.mutate(program, rng)
        assert how
        same += program_lib.key(child) == program_lib.key(program)  # only when 100 tries all change dead code
        program_lib.check(child)
        assert program_lib.from_json(program_lib.to_json(child)) == child
        seen.add(how.split()[0])
        program = space.seed if step % 40 == 39 else child
    assert {"delete", "insert", "field", "swap"} <= seen and seen & {"constant", "dim"}
    assert same <= count // 100, same


def test_the_rediscovery_preset_edits_only_the_head_and_feed_forward():
    space = program_space.make("rediscovery", embed_dim=EMBED, num_heads=HEADS, mlp_dim=MLP)
    rng = np.random.default_rng(1)
    for _ in range(200):
        child, _ = space.mutate(space.seed, rng)
        assert child.subprograms[:2] == space.seed.subprograms[:2]
        ops = {ins.op for sub in child.subprograms[2:] for ins in sub}
        assert ops <= {ins.op for sub in space.seed.subprograms for ins in sub} | set(
            program_space.REDISCOVERY_OPS)
    with pytest.raises(ValueError, match="Unknown program search preset 'nope'"):
        program_space.make("nope", embed_dim=EMBED, num_heads=HEADS, mlp_dim=MLP)


def test_primer_finds_recognises_squared_relu_and_the_dconv_after_a_projection():
    assert program_space.primer_finds(seeds.primer_ez(EMBED, HEADS, MLP)) == {
        "squared_relu": True, "dconv_after_projection": True}
    assert program_space.primer_finds(seeds.vanilla(EMBED, HEADS, MLP)) == {
        "squared_relu": False, "dconv_after_projection": False}
    vanilla = seeds.vanilla(EMBED, HEADS, MLP)  # + square(relu) that nothing reads: dead code is no find
    dense_in, relu, dense_out = vanilla.subprograms[seeds.FEED_FORWARD]
    dead = (dense_in, relu, Instruction("square", 3), dataclasses.replace(dense_out, in1=3))
    subs = vanilla.subprograms[:seeds.FEED_FORWARD] + (dead,)
    assert not program_space.primer_finds(dataclasses.replace(vanilla, subprograms=subs))["squared_relu"]


def rediscovery_rate(preset: str, children: int = 600) -> float:
    """The fraction of single mutations of the seed whose live program holds squared ReLU or a dconv after a
    projection."""
    space = program_space.make(preset, embed_dim=EMBED, num_heads=HEADS, mlp_dim=MLP)
    rng = np.random.default_rng(0)
    hits = sum(any(program_space.primer_finds(space.mutate(space.seed, rng)[0]).values()) for _ in range(children))
    return hits / children


def test_the_rediscovery_preset_puts_primers_finds_one_mutation_away():
    # Expected about 1/43 for rediscovery (program_space's docstring) and about 1/1,500 for Primer's own inserts.
    assert rediscovery_rate("rediscovery") > 1 / 70
    assert rediscovery_rate("full") < 1 / 200


def primitive_program(op: str) -> Program:
    """h1 = dense(h0); h2 = t_matmul(h1, h0) (scores); h3 = op on a state of the kind it takes; out = h0 + it."""
    kinds = prims.PRIMITIVES[op].kinds
    first = 2 if kinds[0] == prims.S else 1
    block = (Instruction("dense", 0, dim=0), Instruction("t_matmul", 1, 0),
             Instruction(op, first, 1, const=0, dim=0))
    if prims.PRIMITIVES[op].out == prims.S or (prims.PRIMITIVES[op].out == "=" and first == 2):
        block += (Instruction("matmul", 3, 1),)  # scores back to features
    block += (Instruction("add", 0, len(block)),)
    return Program((block,), constants=(0.5,), dims=(16,))


# The default tier runs one primitive of each family; the slow tier runs every one.
FIRST = ("dense", "dconv3", "t_matmul", "matmul", "softmax", "cum_prod")
PRIMITIVE_CASES = slow_after(list(FIRST) + sorted(set(prims.PRIMITIVES) - set(FIRST)), keep=len(FIRST))


@pytest.mark.parametrize("op", PRIMITIVE_CASES)
def test_every_primitive_runs_forward_and_backward_and_stays_causal(op):
    program = primitive_program(op)
    trace = program_lib.trace(program)
    assert any(node.op == op for node in trace.nodes), program_lib.canonical(trace)
    block = interpreter.ProgramBlock(program)
    x = 0.5 * jax.random.normal(jax.random.key(0), (1, 6, 16))
    variables = block.init(jax.random.key(1), x)
    loss = lambda v, x: jnp.sum(jnp.sin(block.apply(v, x)))  # noqa: E731
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(variables, x)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    if prims.PRIMITIVES[op].params:
        assert all(np.any(g != 0) for g in jax.tree.leaves(grads[0]["params"]["program"][f"i{2}"]))
    assert not interpreter.leaks_future(lambda z: block.apply(variables, z), x, 2)


def test_random_programs_never_see_the_future_and_the_leak_check_can_fail():
    space = program_space.make("full", embed_dim=16, num_heads=2, mlp_dim=64)
    rng = np.random.default_rng(3)
    x = jax.random.normal(jax.random.key(0), (1, 6, 16))
    program = space.seed
    for _ in range(6):
        for _ in range(3):
            program, _ = space.mutate(program, rng)
        block = interpreter.ProgramBlock(program)
        variables = block.init(jax.random.key(0), x)
        assert not interpreter.leaks_future(lambda z, b=block, v=variables: b.apply(v, z), x, 3), \
            program_lib.listing(program)
    assert interpreter.leaks_future(lambda z: jnp.flip(z, axis=1), x, 3)
    assert interpreter.leaks_future(lambda z: z + jnp.mean(z, axis=1, keepdims=True), x, 3)


@pytest.mark.slow  # the default tier's twin: test_search_cli's config test builds a program model
def test_a_program_replaces_every_block_of_the_decoder_lm():
    program = seeds.primer_ez(EMBED, HEADS, MLP)
    model = models.build("decoder_lm", vocab_size=40, num_classes=None, num_layers=2, embed_dim=EMBED,
                         num_heads=HEADS, mlp_dim=MLP, program=json.dumps(program_lib.to_json(program)))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, 40)
    variables = model.init(jax.random.key(1), tokens)
    assert {"block_0", "block_1"} <= set(variables["params"]["trunk"])
    assert "program" in variables["params"]["trunk"]["block_1"]
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 12, 40) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match="neither program JSON nor a readable file"):
        models.build("decoder_lm", vocab_size=40, num_classes=None, program="/no/such.json").init(
            jax.random.key(1), tokens)
