"""docs/methods.md's token-reduction table lists exactly the registered methods with their declared place and
learning, so the docs cannot drift from the code."""

import os
import re

from effjax import tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_table():
    text = open(os.path.join(ROOT, "docs", "methods.md")).read()
    section = text[text.index("## Token reduction"):]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]], strict=True))
        rows[cells["name"].strip("`")] = cells
    return rows


def test_the_token_table_lists_every_method_with_its_place_and_learning():
    rows = token_table()
    assert sorted(rows) == tokens.names()
    for name, row in rows.items():
        spec = tokens.spec(name)
        if name != "ras":  # sampler-level: its place column says so
            assert row["place"] == spec.place, name
        assert row["learned"].split()[0] in ("yes", "no", "optional"), name
        assert (row["learned"].split()[0] == "yes") == spec.learned, name
