"""Fixed ListOps vocabulary: pad 0, then the four operators, the closing ``X`` and the digits.

LRA built its vocabulary from ``list(set(tokens))``, so ids could change between processes and a
reloaded model saw shuffled tokens (lra.md §7.4). Ours is a constant tuple. There is no unknown
token: ListOps has exactly 15 symbols, so ``encode`` raises on anything else and the vocabulary
size is 16 (LRA's was 17 with its OOV bucket).
"""

from collections.abc import Iterable

PAD = 0
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "X"
TOKENS = (*OPERATORS, CLOSE, *(str(d) for d in range(10)))
TOKEN_TO_ID = {token: i + 1 for i, token in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS) + 1

OPERATOR_IDS = tuple(TOKEN_TO_ID[op] for op in OPERATORS)  # 1..4
CLOSE_ID = TOKEN_TO_ID[CLOSE]  # 5
DIGIT_OFFSET = TOKEN_TO_ID["0"]  # digit d has id d + 6

# LRA's raw form writes the closing bracket as ']' and wraps pairs in '( )'; both map here too.
_ALIASES = {"]": CLOSE_ID, "(": None, ")": None}


def encode(text: str) -> list[int]:
    """Whitespace-separated ListOps tokens (stripped or LRA's raw nested form) to ids."""
    ids = []
    for token in text.split():
        i = TOKEN_TO_ID.get(token, _ALIASES.get(token, -1))
        if i == -1:
            raise ValueError(f"Unknown ListOps token {token!r}; known: {' '.join(TOKENS)}.")
        if i is not None:
            ids.append(i)
    return ids


def decode(ids: Iterable[int]) -> str:
    """Ids to the stripped token string; padding is dropped."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ListOps ids must lie in [0, {VOCAB_SIZE}); got {bad[0]}.")
    return " ".join(TOKENS[i - 1] for i in ids if i != PAD)
