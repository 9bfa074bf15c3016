"""Token-reduction schedules and plans: ToMe's r forms, keep ratios, the catalog's counts, and bad input."""

import pytest

from effjax.tokens import plan as plan_lib
from effjax.tokens import schedule, spec

TOME_CAP = spec("tome").max_removed


def entering(counts, start):
    """Tokens entering each block, from the counts left after each block's reduction."""
    out, n = [], start
    for left in counts:
        out.append(n)
        n = n if left is None else left
    return out, n


@pytest.mark.parametrize("r,blocks,after", [
    (8, [197 - 8 * i for i in range(12)], 101),
    (13, [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54], 41),
    (16, [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21], 11),  # the last merge capped at 10
    ("(16,-1)", [197, 165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10], 10),
])
def test_tome_counts_on_vit_b16_match_the_catalog(r, blocks, after):
    counts = schedule.counts(197, 1, 12, r=r, max_removed=TOME_CAP)
    assert entering(counts, 197) == (blocks, after)


def test_tome_inflection_ramp_is_the_papers_decreasing_schedule():
    assert schedule.parse_r("(16, -1)", 12) == (32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0)
    assert schedule.parse_r((16, 8), 12) == (16, 8) + (0,) * 10  # linen makes lists tuples: a tuple is a list
    assert schedule.parse_r("(16, 0)", 12) == (16,) * 12
    assert schedule.parse_r("8,8,4", 5) == (8, 8, 4, 0, 0)
    assert schedule.parse_r([8, 8, 4], 3) == (8, 8, 4)


def test_dynamicvit_keep_ratio_gives_its_kept_counts_per_stage():
    counts = schedule.counts(197, 1, 12, keep=0.7, layers="3,6,9")
    assert [c for c in counts if c is not None] == [1 + 137, 1 + 96, 1 + 67]
    assert counts[3] == 138 and counts[6] == 97 and counts[9] == 68
    assert schedule.counts(197, 1, 12, keep="0.7,0.7,0.7", layers=(3, 6, 9)) == counts


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "needs a schedule"),
    (dict(r=4, keep=0.5), "both set"),
    (dict(r="(16,-1,2)"), "ToMe's \\(r, inflection\\)"),
    (dict(r="(16,-3)"), "inflection in \\[-1, 1\\]"),
    (dict(r=[1] * 13), "lists 13 removals but the model has 12 layers"),
    (dict(r=-1), "layer 0 -1 tokens to remove"),
    (dict(r="sixteen"), "is not a number"),
    (dict(keep=1.5), "keep ratios must be in \\(0, 1\\]"),
    (dict(keep="0.7,0.7", layers="3,6,9"), "lists 2 ratios for 3 reducing layers"),
    (dict(keep=0.5, layers="3,12"), "outside the 12 layers"),
    (dict(keep=0.5, layers="6,3"), "increasing"),
    (dict(r=20), "layer 9 would remove 20 of its 17 tokens"),
])
def test_bad_schedules_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        schedule.counts(197, 1, 12, **kwargs)  # no cap: a pruning method may remove every non-prefix token
    assert "\n" not in str(err.value)


def test_plan_names_unknown_methods_fields_params_and_prefix_limits():
    common = dict(num_layers=12, num_tokens=197, prefix=1)
    assert plan_lib.plan(None, **common) is None and plan_lib.plan({"method": ""}, **common) is None
    with pytest.raises(ValueError, match="Unknown token-reduction method 'tomee'.*Did you mean 'tome'"):
        plan_lib.plan(dict(method="tomee", r=8), **common)
    with pytest.raises(ValueError, match="model.tokens has no field\\(s\\) ratio"):
        plan_lib.plan(dict(method="tome", ratio=8), **common)
    with pytest.raises(ValueError, match="'tome' has no parameter\\(s\\) alpha"):
        plan_lib.plan(dict(method="tome", r=8, params={"tome": {"alpha": 1}}), **common)
    with pytest.raises(ValueError, match="keeps 0..2 prefix tokens.*has 3"):
        plan_lib.plan(dict(method="tome", r=8), num_layers=12, num_tokens=197, prefix=3)
    found = plan_lib.plan(dict(method="tome", r="(16,-1)", params={"tome": {}}), **common)
    assert found.step(0).keep == 165 and found.step(11) is None and found.prop_attn
