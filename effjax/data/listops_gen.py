"""Vectorised LRA ListOps generator (lra.md §3.1), plus the naive evaluator that checks it.

LRA samples one tree at a time, depth first, in Python. The distribution only depends on each node
being drawn independently (an operator with probability VALUE_P below max_depth, else a digit), so
here a round of trees is grown level by level over numpy arrays: one set of draws per depth for all
nodes of all trees. A tree is dropped as soon as its tokens so far plus one per pending child reach
max_length, which makes the ~92% of trees that fall outside the length window cheap.
"""

import hashlib

import numpy as np

from effjax.data import tokenizer

VALUE_P = 0.25  # LRA: a node below max_depth is an operator iff random() <= VALUE_P
ROUND_SIZE = 1 << 14  # root draws per vectorised round; part of the seeded stream, so keep it fixed
_MAX_IDLE_ROUNDS = 50  # rounds without a new unique tree before the parameters are declared infeasible

_MAX, _MIN, _MED, _SM = range(4)  # operator indices, in tokenizer.OPERATORS order
_OPERATOR_IDS = np.asarray(tokenizer.OPERATOR_IDS, np.uint8)


def generate(*, num_examples: int, max_depth: int, max_args: int, min_length: int, max_length: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique trees with min_length < tokens < max_length: (uint8 ids [N, max_length], uint8 labels [N])."""
    if not (max_depth >= 1 and max_args >= 2 and 0 <= min_length and min_length + 1 < max_length):
        raise ValueError(f"Infeasible ListOps parameters: max_depth={max_depth} (>= 1), max_args={max_args} "
                         f"(>= 2), min_length={min_length}, max_length={max_length} (need min_length + 1 < "
                         "max_length).")
    rng = np.random.default_rng(seed)
    tokens = np.zeros((num_examples, max_length), np.uint8)
    labels = np.zeros(num_examples, np.uint8)
    seen, count, idle = set(), 0, 0
    while count < num_examples:
        round_tokens, round_labels = sample_round(rng, max_depth, max_args, min_length, max_length)
        before = count
        for row, label in zip(round_tokens, round_labels, strict=True):
            digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                tokens[count], labels[count] = row, label
                count += 1
                if count == num_examples:
                    break
        idle = 0 if count > before else idle + 1
        if idle == _MAX_IDLE_ROUNDS:
            raise ValueError(f"Found only {count} unique ListOps trees with {min_length} < length < "
                             f"{max_length} (max_depth={max_depth}, max_args={max_args}); {num_examples} "
                             "were requested.")
    return tokens, labels


def sample_round(rng, max_depth, max_args, min_length, max_length):
    """Grows ROUND_SIZE trees level by level; returns the accepted ones' ids and labels, in root order."""
    n_roots = ROUND_SIZE
    tree = np.arange(n_roots, dtype=np.int32)  # per node of the current level: its tree
    parent = np.full(n_roots, -1, np.int32)  # ... and its parent's index in the previous level
    length = np.zeros(n_roots, np.int64)
    alive = np.ones(n_roots, bool)
    accepted = np.zeros(n_roots, bool)
    levels = []
    for depth in range(1, max_depth + 1):
        n = len(tree)
        is_op = rng.random(n) <= VALUE_P if depth < max_depth else np.zeros(n, bool)
        sym = np.where(is_op, rng.integers(0, 4, n), rng.integers(0, 10, n)).astype(np.uint8)
        arity = np.where(is_op, rng.integers(2, max_args + 1, n), 0).astype(np.int32)
        levels.append((tree, parent, is_op, sym))
        length += np.bincount(tree, weights=1 + is_op, minlength=n_roots).astype(np.int64)
        pending = np.bincount(tree, weights=arity, minlength=n_roots).astype(np.int64)
        in_bounds = alive & (length + pending < max_length)
        accepted |= in_bounds & (pending == 0) & (length > min_length)
        alive = in_bounds & (pending > 0)
        grow = np.flatnonzero(is_op & alive[tree])
        if not len(grow):
            break
        parent = np.repeat(grow, arity[grow]).astype(np.int32)
        tree = tree[parent]
    return _serialise(levels, accepted, max_length)


def _serialise(levels, accepted, max_length):
    """Writes the accepted trees' prefix token rows and evaluates their labels, bottom-up then top-down."""
    row_of = np.cumsum(accepted) - 1
    kept = []  # per level: (row, parent, is_op, sym) of nodes in accepted trees, parents re-indexed
    new_index = None
    for tree, parent, is_op, sym in levels:
        keep = accepted[tree]
        par = parent[keep] if new_index is None else new_index[parent[keep]]
        kept.append((row_of[tree[keep]], par, is_op[keep], sym[keep]))
        new_index = np.cumsum(keep) - 1
    sizes = [None] * len(kept)
    child_sizes = child_values = child_parent = None
    for d in range(len(kept) - 1, -1, -1):  # bottom-up: subtree sizes and values
        _, par, is_op, sym = kept[d]
        size = 1 + is_op.astype(np.int64)
        value = sym.astype(np.int64)
        if child_parent is not None and len(child_parent):
            size += np.bincount(child_parent, weights=child_sizes, minlength=len(sym)).astype(np.int64)
            ops = np.flatnonzero(is_op)
            op_rank = np.cumsum(is_op) - 1
            hist = np.bincount(op_rank[child_parent] * 10 + child_values, minlength=len(ops) * 10)
            value[ops] = _apply_ops(sym[ops], hist.reshape(len(ops), 10).astype(np.int16))
        sizes[d] = size
        child_sizes, child_values, child_parent = size, value, par
    tokens = np.zeros((int(accepted.sum()), max_length), np.uint8)
    pos = np.zeros(len(kept[0][0]), np.int64)
    for d, (row, par, is_op, sym) in enumerate(kept):  # top-down: start positions, then the ids
        if d:
            pos = _child_positions(pos, par, sizes[d])
        ids = sym + np.uint8(tokenizer.DIGIT_OFFSET)
        ids[is_op] = _OPERATOR_IDS[sym[is_op]]
        tokens[row, pos] = ids
        tokens[row[is_op], pos[is_op] + sizes[d][is_op] - 1] = tokenizer.CLOSE_ID
    return tokens, child_values.astype(np.uint8)


def _child_positions(parent_pos, parent, size):
    """Start positions of children: parent start + 1 + the sizes of the earlier siblings."""
    before = np.cumsum(size) - size  # exclusive prefix sum over the whole level
    first = np.ones(len(parent), bool)
    first[1:] = parent[1:] != parent[:-1]  # siblings are contiguous, in order
    group_base = before[first][np.cumsum(first) - 1]
    return parent_pos[parent] + 1 + before - group_base


def _apply_ops(op, hist):
    """Operator values from per-node histograms of child values (digits 0-9)."""
    digits = np.arange(10)
    cum = np.cumsum(hist, axis=1)
    n = cum[:, -1:]
    low = np.argmax(cum > (n - 1) // 2, axis=1)  # floored median: mean of the two middle values
    high = np.argmax(cum > n // 2, axis=1)
    return np.select(
        [op == _MAX, op == _MIN, op == _MED],
        [9 - np.argmax(hist[:, ::-1] > 0, axis=1), np.argmax(hist > 0, axis=1), (low + high) // 2],
        hist @ digits % 10)


def evaluate(ids) -> int:
    """Naive recursive evaluation of one id sequence (padding ignored); the reference for tests."""
    ids = [int(i) for i in ids if int(i) != tokenizer.PAD]
    value, end = _evaluate_at(ids, 0)
    if end != len(ids):
        raise ValueError(f"Trailing tokens after position {end} in a ListOps sequence.")
    return value


def _evaluate_at(ids, i):
    if tokenizer.DIGIT_OFFSET <= ids[i] < tokenizer.DIGIT_OFFSET + 10:
        return ids[i] - tokenizer.DIGIT_OFFSET, i + 1
    op, args, i = tokenizer.OPERATOR_IDS.index(ids[i]), [], i + 1
    while ids[i] != tokenizer.CLOSE_ID:
        value, i = _evaluate_at(ids, i)
        args.append(value)
    if op == _MAX:
        return max(args), i + 1
    if op == _MIN:
        return min(args), i + 1
    if op == _MED:
        return int(np.median(args)), i + 1
    return sum(args) % 10, i + 1


def majority_class_rate(labels) -> float:
    """Share of the most frequent label: the accuracy of always predicting it."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
