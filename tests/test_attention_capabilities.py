"""The capability declarations (``effjax.attention._capabilities``) against docs/methods.md and README.md.

Whether each method does what it declares is ``tests/test_attention_conformance.py``'s job; here the method
table, the list of kernel methods and the counts in the docs must come out of the declarations.
"""

import dataclasses
import importlib
import pathlib
import re

import pytest

from effjax import attention
from effjax.attention._capabilities import FLAGS, Capabilities, capabilities, supporting

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS_MD = ROOT / "docs" / "methods.md"
README = ROOT / "README.md"


def method_table(text):
    """``{name: {column: cell}}`` of the table in docs/methods.md whose header starts ``| name |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    split = lambda line: [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    header = split(lines[start])
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, split(line), strict=True))
        rows[cells["name"].strip("`")] = cells
    return rows


def yes_or_no(cell):
    """True for a cell starting "yes", False for "no" (either may be followed by a comment)."""
    word = cell.split()[0].strip(",;") if cell.split() else ""
    assert word in ("yes", "no"), f"capability cell must start with yes or no, got {cell!r}"
    return word == "yes"


def check_method_table(text):
    """Asserts the table lists every method once, its flag columns match the declarations, and any flag
    without a column is declared by no method."""
    rows = method_table(text)
    assert sorted(rows) == attention.names(), "docs/methods.md's table must list exactly the registered methods"
    columns = next(iter(rows.values())).keys()
    for flag in FLAGS:
        if flag not in columns:
            assert not supporting(flag), f"docs/methods.md's table needs a {flag} column: {supporting(flag)}"
            continue
        wrong = {name: row[flag] for name, row in rows.items() if yes_or_no(row[flag]) != getattr(
            capabilities(name), flag)}
        assert not wrong, f"docs/methods.md's {flag} column disagrees with CAPABILITIES: {wrong}"


def word_or_number(token):
    """An int from digits or a number word ("Sixteen"), as the docs may write counts either way."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
    return int(token) if token.isdigit() else words.index(token.lower())


def stated_count(text, pattern):
    """The count that ``pattern`` (a regex with one group before it) captures in ``text``, exactly once."""
    found = re.findall(r"\b(\d+|[A-Za-z]+) " + pattern, text)
    assert len(found) == 1, f"expected one count before {pattern!r}, found {found}"
    return word_or_number(found[0])


def kernel_list(text):
    """The method names in docs/methods.md's list of kernel paths (from 'take `impl="pallas"`' to a blank line)."""
    start = text.index('methods take `impl="pallas"`')
    block = text[start:text.index("\n\n", start)]
    return sorted(set(re.findall(r"`([a-z_0-9]+)`", block)) & set(attention.names()))


def check_counts(methods_md, readme):
    """Asserts the counts of methods and of kernel methods in both files, and the kernel list, match."""
    pallas = supporting("pallas")
    zoo = readme[readme.index("## The attention zoo"):]
    zoo = zoo[:zoo.index("\n## ", 1)]
    assert stated_count(zoo, r"now\)") == len(attention.names()), "README's method count ('(N now)') is stale"
    assert stated_count(zoo, "methods have a kernel path") == len(pallas), "README's kernel method count is stale"
    assert stated_count(methods_md, r'methods take `impl="pallas"`') == len(pallas), "methods.md's kernel count"
    assert kernel_list(methods_md) == pallas, "docs/methods.md's list of kernel paths disagrees with CAPABILITIES"
    decoders = len(supporting("decode"))
    assert stated_count(methods_md, "methods decode") == decoders, "methods.md's count of decoding methods is stale"
    assert stated_count(zoo, "methods decode") == decoders, "README's count of decoding methods is stale"
    extenders = len(supporting("extend"))
    assert stated_count(methods_md, "methods continue a cache") == extenders, "methods.md's count of extends is stale"
    assert stated_count(zoo, "methods continue a cache") == extenders, "README's count of extending methods is stale"


def flip(monkeypatch, name, flag):
    """Makes method ``name`` declare the opposite of its ``flag`` for one test."""
    module = importlib.import_module(f"effjax.attention.{name}")
    wrong = dataclasses.replace(module.CAPABILITIES, **{flag: not getattr(module.CAPABILITIES, flag)})
    monkeypatch.setattr(module, "CAPABILITIES", wrong)


def test_every_method_declares_capabilities():
    for name in attention.names():
        assert isinstance(capabilities(name), Capabilities), name


def test_capabilities_refuses_unknown_names_and_flags():
    with pytest.raises(ValueError, match="Unknown attention method"):
        capabilities("sofmax")
    with pytest.raises(ValueError, match="Unknown capability"):
        supporting("casual")


def test_the_methods_table_matches_the_declarations():
    check_method_table(METHODS_MD.read_text())


def test_the_counts_in_the_readme_and_methods_md_match_the_declarations():
    check_counts(METHODS_MD.read_text(), README.read_text())


@pytest.mark.parametrize("flag", FLAGS)
def test_a_wrong_declaration_fails_the_table_check(monkeypatch, flag):
    flip(monkeypatch, "softmax", flag)
    with pytest.raises(AssertionError):
        check_method_table(METHODS_MD.read_text())


@pytest.mark.parametrize("name", ["softmax", "histogram"])
def test_a_wrong_pallas_declaration_fails_the_count_check(monkeypatch, name):
    flip(monkeypatch, name, "pallas")
    with pytest.raises(AssertionError):
        check_counts(METHODS_MD.read_text(), README.read_text())


def test_stale_counts_fail_the_docs_checks():
    readme = README.read_text()
    stale = readme.replace(f"({len(attention.names())} now)", f"({len(attention.names()) - 1} now)")
    with pytest.raises(AssertionError):
        check_counts(METHODS_MD.read_text(), stale)
