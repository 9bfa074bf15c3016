"""LRA Retrieval: the AAN TSV source (byte encoding, splits, errors) and the two-tower dual_encoder model."""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effjax.data as data
import effjax.models as models
from configs import common as config_common
from effjax.models import dual_encoder
from effjax.train import trainer

LONG = "long text " * 1500  # 15,000 bytes: past LRA's 10,000-byte cut
PAIRS = [  # label, id1, id2, text1, text2
    (1, "P01-1001", "P99-1002", "Héllo wörld — naïve façade", "日本語のテキスト and ASCII"),
    (0, "P02-2001", "J98-3003", "short", ""),
    (1, "W03-0301", "C04-1004", LONG, "emoji 🙂 and a NUL \x00 byte"),
    (0, "E05-5005", "N06-6006", "x" * 40, "y" * 31 + "é"),  # the é's two bytes straddle position 32
]


def write_tsv(path, pairs, *, header=False, float_labels=False):
    lines = ["label\tid1\tid2\ttext1\ttext2"] if header else []
    for label, *rest in pairs:
        lines.append("\t".join([f"{label:.1f}" if float_labels else str(label), *rest]))
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


@pytest.fixture(scope="module")
def aan_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tsv_data")
    write_tsv(directory / "new_aan_pairs.train.tsv", PAIRS * 4)  # 16 pairs: two batches of 8
    write_tsv(directory / "new_aan_pairs.eval.tsv", PAIRS[::-1], header=True)
    write_tsv(directory / "new_aan_pairs.test.tsv", PAIRS[:3], float_labels=True)
    return directory


def reference_ids(text: str, length: int) -> list[int]:
    """LRA's encoding written out: UTF-8, first 10,000 bytes, byte + 1, first ``length``, zero padding."""
    ids = [b + 1 for b in text.encode("utf-8")[:10_000]][:length]
    return ids + [0] * (length - len(ids))


# --- the source ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [32, 12_000])
def test_each_half_is_one_document_as_bytes_plus_one(aan_dir, length):
    source = data.make_source("aan", "train", data_dir=str(aan_dir), max_length=length)
    assert (source.task, source.vocab_size, source.num_classes, source.max_length) == (
        "classification", 257, 2, 2 * length)
    assert len(source) == 16
    for i, (label, _, _, text1, text2) in enumerate(PAIRS):
        example = source[i]
        assert example["inputs"].dtype == np.int32 and example["inputs"].shape == (2 * length,)
        assert example["targets"].dtype == np.int32 and example["targets"].shape == () and example["targets"] == label
        assert example["inputs"][:length].tolist() == reference_ids(text1, length)
        assert example["inputs"][length:].tolist() == reference_ids(text2, length)
    long_doc = source[2]["inputs"][:length]
    assert (long_doc > 0).sum() == min(length, 10_000)  # the 15,000-byte text keeps its first 10,000 bytes
    assert 1 in source[2]["inputs"][length:].tolist()  # a NUL byte is id 1, not padding


def test_splits_read_train_eval_and_test_files_with_or_without_header(aan_dir):
    splits = {s: data.make_source("aan", s, data_dir=str(aan_dir), max_length=16) for s in data.common.SPLITS}
    assert [len(splits[s]) for s in data.common.SPLITS] == [16, 4, 3]
    assert splits["validation"].labels.tolist() == [p[0] for p in PAIRS[::-1]]  # header row skipped
    assert splits["test"].labels.tolist() == [p[0] for p in PAIRS[:3]]  # '1.0' / '0.0' labels
    for i in range(3):
        np.testing.assert_array_equal(splits["test"][i]["inputs"], splits["train"][i]["inputs"])
        np.testing.assert_array_equal(splits["validation"][3 - i]["inputs"], splits["train"][i]["inputs"])


def test_repr_and_pickle_name_content_not_location(aan_dir):
    source = data.make_source("aan", "test", data_dir=str(aan_dir), max_length=16)
    assert repr(source) == "AanPairs(split='test', max_length=16)"
    restored = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(restored[1]["inputs"], source[1]["inputs"])


@pytest.mark.parametrize("data_dir", ["missing", ""])
def test_missing_file_names_it_and_how_to_get_it(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError) as error:
        data.make_source("aan", "test", data_dir=str(tmp_path / data_dir) if data_dir else "")
    message = str(error.value)
    assert "\n" not in message and "new_aan_pairs.test.tsv" in message
    assert "https://storage.googleapis.com/long-range-arena/lra_release.gz" in message
    assert "--config.data.data_dir" in message and "lra_release/tsv_data" in message


@pytest.mark.parametrize("row, problem", [
    ("1\tP01\tP02\tonly four fields", "expected 5 tab-separated fields.*found 4"),
    ("1\tP01\tP02\ta\tb\tc", "found 6"),
    ("2\tP01\tP02\ta\tb", "label '2' is not 0 or 1"),
    ("yes\tP01\tP02\ta\tb", "label 'yes' is not 0 or 1"),  # not line 1, so not a header
])
def test_malformed_row_names_file_and_line(tmp_path, row, problem):
    path = tmp_path / "new_aan_pairs.train.tsv"
    write_tsv(path, PAIRS[:2])
    path.write_bytes(path.read_bytes() + row.encode() + b"\n")
    with pytest.raises(ValueError, match=f"new_aan_pairs.train.tsv, line 3: .*{problem}") as error:
        data.make_source("aan", "train", data_dir=str(tmp_path), max_length=8)
    assert "\n" not in str(error.value)


# --- the model ----------------------------------------------------------------------------------------------

SMALL = dict(max_length=16, num_layers=1, embed_dim=16, num_heads=2, mlp_dim=24, dropout_rate=0.0,
             attention_dropout_rate=0.0)


def build(**kw):
    return models.build("dual_encoder", vocab_size=257, num_classes=2, **{**SMALL, **kw})


class Jitted:
    """A model's init, logits and one-tower ``encode``, each compiled once (eager flax dispatches op by op)."""

    def __init__(self, model, seed=0):
        self.model = model
        self.variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32), jnp.int32))
        self.params = unboxed(self.variables)["params"]
        self._logits = jax.jit(model.apply)
        self._encode = jax.jit(functools.partial(model.apply, method=dual_encoder.Model.encode))

    def logits(self, doc1, doc2, params=None):
        variables = self.variables if params is None else {"params": params}
        return np.asarray(self._logits(variables, jnp.concatenate([doc1, doc2], axis=1)), np.float64)

    def encode(self, tokens, mask=None):
        """Pooled [n, embed]; ``mask`` defaults to ``tokens != 0`` (passed explicitly: one compile for both)."""
        mask = tokens != 0 if mask is None else mask
        return np.asarray(self._encode(self.variables, tokens, mask), np.float64)


@pytest.fixture(scope="module", params=["cls", "mean"])
def net(request):
    return Jitted(build(pooling=request.param), seed=1)


def documents(seed, batch=3, length=16, real=(16, 9, 1)):
    """int32 [batch, length] byte ids with ``real[i]`` real tokens in row i, then padding."""
    ids = np.array(jax.random.randint(jax.random.key(seed), (batch, length), 1, 257), np.int32)
    ids[np.arange(length) >= np.array(real)[:, None]] = 0
    return jnp.asarray(ids)


def numpy_head(head_params, x1, x2):
    """The paper's head written out: MLP([X1, X2, X1*X2, X1-X2]) = Dense, ReLU, Dense, ReLU, Dense."""
    x = np.concatenate([x1, x2, x1 * x2, x1 - x2], axis=1)
    for i in range(3):
        layer = head_params[f"dense_{i}"]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        x = np.maximum(x, 0) if i < 2 else x
    return x


def unboxed(variables):
    return jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, variables,
                        is_leaf=lambda p: hasattr(p, "unbox"))


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("interaction, head_inputs", [("nli", 4 * 16), ("concat", 2 * 16)])
def test_logits_shape_and_one_trunk_shared_by_both_towers(interaction, head_inputs):
    model = build(interaction=interaction)
    tokens = jnp.zeros((3, 32), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert jax.eval_shape(model.apply, variables, tokens).shape == (3, 2)
    params = unboxed(variables)["params"]
    assert set(params) == {"trunk", "head"} and "block_0" in params["trunk"] and "block_1" not in params["trunk"]
    assert params["head"]["dense_0"]["kernel"].shape == (head_inputs, 24)
    assert params["head"]["dense_1"]["kernel"].shape == (24, 12)
    assert params["head"]["dense_2"]["kernel"].shape == (12, 2)
    # One tower's worth of trunk weights: the single-tower classifier's trunk at the same size.
    trunk_only = models.build("encoder_classifier", vocab_size=257, num_classes=2, **SMALL)
    shapes = jax.eval_shape(trunk_only.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    assert count(params["trunk"]) == count(unboxed(shapes)["params"]["trunk"])


def test_head_is_the_paper_mlp_and_swapping_flips_only_the_asymmetric_features(net):
    doc1, doc2 = documents(2), documents(3, real=(5, 16, 12))
    x1, x2 = net.encode(doc1), net.encode(doc2)
    logits, swapped = net.logits(doc1, doc2), net.logits(doc2, doc1)
    head = net.params["head"]
    np.testing.assert_allclose(logits, numpy_head(head, x1, x2), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(swapped, numpy_head(head, x2, x1), rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, swapped, atol=1e-4)
    # Through the parameters: exchanging the X1 and X2 rows of the first kernel and negating the X1-X2 rows (the
    # X1*X2 rows stay) makes the swapped pair give the original logits.
    blocks = np.split(np.asarray(head["dense_0"]["kernel"]), 4)
    assert all(b.shape[0] == x1.shape[1] for b in blocks)
    permuted = jax.tree.map(lambda p: p, net.params)
    permuted["head"]["dense_0"]["kernel"] = jnp.asarray(np.concatenate([blocks[1], blocks[0], blocks[2], -blocks[3]]))
    np.testing.assert_allclose(net.logits(doc2, doc1, permuted), logits, rtol=1e-4, atol=1e-5)


def test_a_tower_ignores_padding_and_the_other_document(net):
    doc = documents(4, real=(16, 6, 2))
    pooled = net.encode(doc)
    behind_mask = jnp.where(doc != 0, doc, documents(5, real=(16, 16, 16)))  # other values behind the same mask
    np.testing.assert_allclose(net.encode(behind_mask, doc != 0), pooled, rtol=1e-5, atol=1e-6)
    assert not np.allclose(net.encode(behind_mask), pooled, atol=1e-4)  # unmasked, those values do count
    # The unpadded document alone, at its own length.
    np.testing.assert_allclose(net.encode(doc[1:2, :6])[0], pooled[1], rtol=1e-4, atol=1e-5)
    # Changing document 2 moves only tower 2: the logits equal the head on (X1, new X2).
    other = documents(6, real=(3, 16, 8))
    np.testing.assert_allclose(net.logits(doc, other), numpy_head(net.params["head"], pooled, net.encode(other)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(interaction="bilinear"), "model.interaction must be 'nli'.*or 'concat'.*got 'bilinear'"),
    (dict(pooling="max"), "model.pooling must be 'cls' or 'mean'"),
    (dict(mlp_dim=1), "model.mlp_dim=1 must be at least 2"),
])
def test_bad_fields_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        jax.eval_shape(build(**fields).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    assert "\n" not in str(error.value)


def test_odd_input_length_is_refused():
    with pytest.raises(ValueError, match="length 9 is odd; use a paired source such as data 'aan'"):
        jax.eval_shape(build().init, jax.random.key(0), jnp.ones((1, 9), jnp.int32))


# --- with the trainer ---------------------------------------------------------------------------------------

def smoke_config(aan_dir):
    config = config_common.shrink_for_smoke(config_common.get_base_config(), total_steps=2, every=2)
    config.model.name = "dual_encoder"
    config.model.pooling = "cls"
    config.model.interaction = "nli"
    config.model.max_length = 32  # per document, like data.max_length: validate's check compares the two
    config.data.name = "aan"
    config.data.data_dir = str(aan_dir)
    config.data.max_length = 32
    config.mesh.fsdp = config.mesh.tensor = 2  # the head's logical axes shard over fsdp x tensor
    return config


def test_trainer_builds_the_run_with_per_document_lengths_and_sharded_head(aan_dir):
    """The default-tier twin of the training run below: config checks, sources, model and shardings."""
    run = trainer.Run(smoke_config(aan_dir))
    assert run.train_source.max_length == 64 and run.model.max_length == 32
    head = run.state_sharding.params["head"]
    assert head["dense_0"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert head["dense_1"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", None)
    assert run.abstract_state.params["trunk"]["pos_embed"].shape == (33, 32)  # 32 bytes + the CLS position
    bad = smoke_config(aan_dir)
    bad.data.max_length = 40
    with pytest.raises(ValueError, match="config.data.max_length=40 exceeds config.model.max_length=32"):
        trainer.Run(bad)


# Training end to end: tests/test_lra_configs.py (slow); under a mesh, the trainer.Run test above.
