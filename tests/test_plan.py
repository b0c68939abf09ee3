"""Behaviour of Site and DropoutPlan: validation, YAML round trip, files, rates, digest, lookup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_dropout import DropoutConfigError, DropoutPlan, Site
from lightning_dropout.plan import WHERE


def _plan() -> DropoutPlan:
    return DropoutPlan(
        [
            Site("encoder.layers.0.linear1", "output", "standard", 0.1),
            Site("conv2", "output", "dropblock", 0.2, {"block_size": 5, "share_channels": True}),
            Site("rnn", "input", "variational", 0.3, {"batch_first": True}),
            Site("rnn", "weight", "weight", 0.25, {"weights": ["weight_hh_l0"]}),
            Site("encoder.layers.0.self_attn", "attribute", "attention", 0.05),
            Site("blocks.1.drop_path", "replace", "droppath", 0.0),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# Site validation
# ----------------------------------------------------------------------------------------------------------
def test_site_key_defaults_and_normalisation() -> None:
    site = Site("net.0", "output", "standard", 0)
    assert site.key == "net.0:output"
    assert site.p == 0.0 and isinstance(site.p, float)
    assert site.params == {}
    assert Site("", "output", "standard", 0.1).key == ":output"  # the root module


@pytest.mark.parametrize("where", WHERE)
def test_site_accepts_every_documented_placement(where: str) -> None:
    variant = {"attribute": "attention", "weight": "weight"}.get(where, "standard")
    assert Site("m", where, variant, 0.1).where == where


def test_site_rejects_bad_where() -> None:
    with pytest.raises(
        DropoutConfigError,
        match=r"`where` must be one of \['output', 'input', 'replace', "
        r"'attribute', 'weight'\], but got where='after'",
    ):
        Site("fc", "after", "standard", 0.1)
    with pytest.raises(DropoutConfigError, match="`where` must be one of"):
        Site("fc", "both", "standard", 0.1)  # 'both' is a Rule option, not a site placement


@pytest.mark.parametrize("p", [1.0, -0.01, 2, float("nan"), float("inf")])
def test_site_rejects_rates_outside_unit_interval(p: float) -> None:
    with pytest.raises(DropoutConfigError, match=r"`p` must satisfy 0 <= p < 1, but got p="):
        Site("fc", "output", "standard", p)


@pytest.mark.parametrize("p", ["0.1", None, True, [0.1]])
def test_site_rejects_non_numeric_rates(p: object) -> None:
    with pytest.raises(DropoutConfigError, match=r"`p` must be a number with 0 <= p < 1, but got p="):
        Site("fc", "output", "standard", p)  # type: ignore[arg-type]


def test_site_rejects_non_string_target() -> None:
    with pytest.raises(DropoutConfigError, match=r"`target` must be a module name \(str\), but got target=3"):
        Site(3, "output", "standard", 0.1)  # type: ignore[arg-type]


def test_site_rejects_unknown_variant_with_suggestion() -> None:
    with pytest.raises(
        DropoutConfigError,
        match=r"`variant` must be one of \[.*'standard'.*\], but got "
        r"variant='droplock'\. Did you mean 'dropblock'\?",
    ):
        Site("fc", "output", "droplock", 0.1)


def test_site_rejects_bad_params_for_the_variant() -> None:
    with pytest.raises(
        DropoutConfigError,
        match=r"variant 'dropblock' takes the parameters \['block_size', "
        r"'share_channels'\], but got unknown \['blocksize'\]",
    ):
        Site("conv", "output", "dropblock", 0.1, {"blocksize": 3})
    with pytest.raises(
        DropoutConfigError,
        match=r"variant 'gaussian' takes the parameters \(none\), but got "
        r"unknown \['scaling'\]",
    ):
        Site("fc", "output", "gaussian", 0.1, {"scaling": "inverted"})
    with pytest.raises(
        DropoutConfigError, match=r"`block_size` must be an integer >= 1, but got block_size=0"
    ):
        Site("conv", "output", "dropblock", 0.1, {"block_size": 0})
    with pytest.raises(DropoutConfigError, match=r"`scaling` must be one of \['inverted', 'inference'\]"):
        Site("fc", "output", "standard", 0.1, {"scaling": "upscale"})
    with pytest.raises(DropoutConfigError, match=r"0 < p < 1 for variant 'concrete'"):
        Site("fc", "output", "concrete", 0.0)


def test_site_is_frozen_hashable_and_copies_params() -> None:
    params = {"block_size": 3}
    site = Site("conv", "output", "dropblock", 0.1, params)
    params["block_size"] = 7
    assert site.params == {"block_size": 3}
    with pytest.raises(AttributeError):
        site.p = 0.2  # type: ignore[misc]
    twin = Site("conv", "output", "dropblock", 0.1, {"block_size": 3})
    assert site == twin and hash(site) == hash(twin) and len({site, twin}) == 1
    assert site != Site("conv", "output", "dropblock", 0.1, {"block_size": 5})


# ----------------------------------------------------------------------------------------------------------
# Site.from_dict
# ----------------------------------------------------------------------------------------------------------
def test_site_from_dict_round_trip_and_default_where() -> None:
    for site in _plan():
        assert Site.from_dict(site.to_dict()) == site
    assert Site.from_dict({"target": "fc", "variant": "standard", "p": 0.1}).where == "output"
    assert Site.from_dict({"target": "fc", "variant": "standard", "p": 0.1, "params": None}).params == {}
    assert "params" not in Site("fc", "output", "standard", 0.1).to_dict()


def test_site_from_dict_unknown_keys_suggest_the_nearest() -> None:
    data = {"target": "fc", "variant": "standard", "p": 0.1, "wher": "input", "parms": {}}
    with pytest.raises(DropoutConfigError) as info:
        Site.from_dict(data)
    message = str(info.value)
    assert "takes the keys ['target', 'where', 'variant', 'p', 'params', 'rates']" in message
    assert "unknown ['parms', 'wher']" in message
    assert "'wher': ['where']" in message and "'parms': ['params']" in message


def test_site_from_dict_missing_keys_are_named() -> None:
    with pytest.raises(
        DropoutConfigError, match=r"site must give \['variant', 'p'\], but got \{'target': 'fc'\}"
    ):
        Site.from_dict({"target": "fc"})
    with pytest.raises(DropoutConfigError, match=r"must give \['target'\]"):
        Site.from_dict({"variant": "standard", "p": 0.1})


def test_site_from_dict_rejects_non_mappings_and_prefixes_errors() -> None:
    with pytest.raises(DropoutConfigError, match=r"plan\.sites\[2\] must be a mapping with keys"):
        Site.from_dict(["fc", "output"], "plan.sites[2]")  # type: ignore[arg-type]
    with pytest.raises(DropoutConfigError, match=r"^plan\.sites\[0\]: `p` must satisfy 0 <= p < 1"):
        Site.from_dict({"target": "fc", "variant": "standard", "p": 1.5}, "plan.sites[0]")
    with pytest.raises(DropoutConfigError, match=r"^x: variant 'dropblock' takes the parameters"):
        Site.from_dict({"target": "c", "variant": "dropblock", "p": 0.1, "params": {"size": 3}}, "x")


# ----------------------------------------------------------------------------------------------------------
# DropoutPlan
# ----------------------------------------------------------------------------------------------------------
def test_plan_basics_and_getitem_by_key() -> None:
    plan = _plan()
    assert len(plan) == 6
    assert [s.key for s in plan] == [s.key for s in plan.sites]
    assert plan["rnn:weight"].params == {"weights": ["weight_hh_l0"]}
    assert plan["rnn:input"].variant == "variational"
    assert plan["conv2:output"].p == 0.2
    with pytest.raises(KeyError, match=r"no site 'rnn:output' in the plan; nearest: \[.*'rnn:input'"):
        plan["rnn:output"]
    assert (
        repr(DropoutPlan([Site("fc", "output", "gaussian", 0.25)]))
        == "DropoutPlan([fc:output=gaussian(0.25)])"
    )
    assert len(DropoutPlan()) == 0 and list(DropoutPlan()) == []


def test_plan_later_duplicate_keys_replace_earlier_ones() -> None:
    plan = DropoutPlan(
        [
            Site("fc1", "output", "standard", 0.1),
            Site("fc2", "output", "standard", 0.2),
            Site("fc1", "output", "gaussian", 0.3),
            Site("fc1", "input", "standard", 0.4),
        ]
    )
    assert len(plan) == 3
    assert (plan["fc1:output"].variant, plan["fc1:output"].p) == ("gaussian", 0.3)
    assert plan["fc1:input"].p == 0.4
    assert sorted(s.key for s in plan) == ["fc1:input", "fc1:output", "fc2:output"]


def test_plan_holds_only_sites() -> None:
    with pytest.raises(DropoutConfigError, match="a plan holds Site objects, but got"):
        DropoutPlan([{"target": "fc", "variant": "standard", "p": 0.1}])  # type: ignore[list-item]


def test_plan_equality_and_hash() -> None:
    assert _plan() == _plan() and hash(_plan()) == hash(_plan())
    assert _plan() != DropoutPlan(list(_plan())[:-1])
    assert _plan() != list(_plan())
    reordered = DropoutPlan(reversed(list(_plan())))
    assert reordered != _plan()  # the order of sites is part of the plan (it is the order of application)


def test_with_rates_returns_a_changed_copy() -> None:
    plan = _plan()
    changed = plan.with_rates({"rnn:input": 0.5, "conv2:output": 0.0})
    assert changed["rnn:input"].p == 0.5 and changed["conv2:output"].p == 0.0
    assert changed["rnn:input"].params == {"batch_first": True}
    assert changed["conv2:output"].params == {"block_size": 5, "share_channels": True}
    assert [s.key for s in changed] == [s.key for s in plan]
    assert {s.key: s.p for s in changed if s.key not in ("rnn:input", "conv2:output")} == {
        s.key: s.p for s in plan if s.key not in ("rnn:input", "conv2:output")
    }
    assert plan == _plan()  # the original is untouched
    assert plan.with_rates({}) == plan


def test_with_rates_rejects_unknown_keys_and_bad_rates() -> None:
    plan = _plan()
    with pytest.raises(
        DropoutConfigError,
        match=r"`rates` names sites not in the plan: \['fc9:output', "
        r"'rnn:output'\]; the sites are \['encoder",
    ):
        plan.with_rates({"rnn:output": 0.1, "fc9:output": 0.2, "rnn:input": 0.3})
    with pytest.raises(DropoutConfigError, match=r"`p` must satisfy 0 <= p < 1, but got p=1.2"):
        plan.with_rates({"rnn:input": 1.2})


# ----------------------------------------------------------------------------------------------------------
# YAML and files
# ----------------------------------------------------------------------------------------------------------
def test_yaml_round_trip_keeps_everything() -> None:
    plan = _plan()
    text = plan.to_yaml()
    again = DropoutPlan.from_yaml(text)
    assert again == plan
    assert [dict(s.params) for s in again] == [dict(s.params) for s in plan]
    assert again.to_yaml() == text
    assert text.startswith(
        "sites:\n- target: encoder.layers.0.linear1\n  where: output\n  variant: standard\n  p: 0.1\n"
    )
    assert "block_size: 5" in text and "share_channels: true" in text and "weight_hh_l0" in text
    assert DropoutPlan.from_dict(plan.to_dict()) == plan


def test_yaml_round_trip_of_tiny_and_zero_rates() -> None:
    plan = DropoutPlan([Site("a", "output", "standard", 1e-5), Site("b", "output", "standard", 0)])
    again = DropoutPlan.from_yaml(plan.to_yaml())
    assert again == plan and [s.p for s in again] == [1e-5, 0.0]


def test_yaml_hand_written_plan() -> None:
    text = """
sites:
  - {target: fc1, variant: gaussian, p: 0.2}
  - target: conv
    where: input
    variant: spatial
    p: 0.1
"""
    plan = DropoutPlan.from_yaml(text)
    assert [(s.key, s.variant, s.p) for s in plan] == [
        ("fc1:output", "gaussian", 0.2),
        ("conv:input", "spatial", 0.1),
    ]


def test_yaml_empty_and_shape_errors() -> None:
    assert DropoutPlan.from_yaml("") == DropoutPlan()
    assert DropoutPlan.from_yaml("sites: []") == DropoutPlan()
    assert DropoutPlan.from_yaml(DropoutPlan().to_yaml()) == DropoutPlan()
    with pytest.raises(
        DropoutConfigError, match=r"plan must be a mapping with the single key 'sites', but got"
    ):
        DropoutPlan.from_yaml("sites: []\nversion: 2\n")
    with pytest.raises(DropoutConfigError, match=r"plan must be a mapping with the single key 'sites'"):
        DropoutPlan.from_yaml("- target: fc\n")
    with pytest.raises(DropoutConfigError, match=r"plan\.sites must be a list, but got \{'target': 'fc'\}"):
        DropoutPlan.from_yaml("sites: {target: fc}\n")
    with pytest.raises(DropoutConfigError, match=r"plan\.sites\[1\]: `where` must be one of"):
        DropoutPlan.from_yaml(
            "sites:\n- {target: a, variant: standard, p: 0.1}\n"
            "- {target: b, where: around, variant: standard, p: 0.1}\n"
        )
    with pytest.raises(
        DropoutConfigError,
        match=r"plan\.sites\[0\] takes the keys .* \(nearest: "
        r"\{'varaint': \['variant'\]\}\)",
    ):
        DropoutPlan.from_yaml("sites:\n- {target: a, varaint: standard, p: 0.1}\n")


def test_invalid_yaml_message() -> None:
    with pytest.raises(DropoutConfigError, match=r"^plan is not valid YAML: "):
        DropoutPlan.from_yaml("sites: [\n  - {target: fc")
    with pytest.raises(DropoutConfigError, match=r"^my.yaml is not valid YAML: "):
        DropoutPlan.from_yaml("sites: {a: [}", where_from="my.yaml")


def test_save_and_load(tmp_path: Path) -> None:
    plan = _plan()
    path = tmp_path / "nested" / "dir" / "plan.yaml"
    returned = plan.save(path)
    assert returned == path and path.is_file()
    assert path.read_text() == plan.to_yaml()
    assert DropoutPlan.load(path) == plan
    assert DropoutPlan.load(str(path)) == plan
    plan.with_rates({"rnn:input": 0.4}).save(str(path))  # overwrite, str path
    assert DropoutPlan.load(path)["rnn:input"].p == 0.4


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        DropoutConfigError, match=rf"a plan file must exist, but got path={re.escape(repr(str(missing)))}"
    ):
        DropoutPlan.load(missing)
    with pytest.raises(DropoutConfigError, match="a plan file must exist"):
        DropoutPlan.load(tmp_path)  # a directory is not a plan file


def test_load_reports_the_file_in_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [\n")
    with pytest.raises(DropoutConfigError, match=rf"^{re.escape(str(bad))} is not valid YAML"):
        DropoutPlan.load(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("sites:\n- {target: fc, variant: standard, p: 1.0}\n")
    with pytest.raises(DropoutConfigError, match=rf"^{re.escape(str(wrong))}\.sites\[0\]: `p` must satisfy"):
        DropoutPlan.load(wrong)


# ----------------------------------------------------------------------------------------------------------
# digest
# ----------------------------------------------------------------------------------------------------------
def test_digest_is_stable_and_short() -> None:
    digest = _plan().digest()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert _plan().digest() == digest
    assert DropoutPlan.from_yaml(_plan().to_yaml()).digest() == digest
    assert DropoutPlan().digest() == DropoutPlan.from_yaml("").digest()
    # the same params given in another order are the same plan, with the same digest
    a = DropoutPlan([Site("c", "output", "dropblock", 0.1, {"block_size": 3, "share_channels": True})])
    b = DropoutPlan([Site("c", "output", "dropblock", 0.1, {"share_channels": True, "block_size": 3})])
    assert a == b and a.digest() == b.digest()


@pytest.mark.parametrize("change", ["p", "variant", "where", "target", "params", "drop", "add"])
def test_digest_differs_for_different_plans(change: str) -> None:
    base = [Site("fc", "output", "standard", 0.1), Site("c", "output", "dropblock", 0.1, {"block_size": 3})]
    other = list(base)
    if change == "p":
        other[0] = Site("fc", "output", "standard", 0.2)
    elif change == "variant":
        other[0] = Site("fc", "output", "gaussian", 0.1)
    elif change == "where":
        other[0] = Site("fc", "input", "standard", 0.1)
    elif change == "target":
        other[0] = Site("fc2", "output", "standard", 0.1)
    elif change == "params":
        other[1] = Site("c", "output", "dropblock", 0.1, {"block_size": 5})
    elif change == "drop":
        other = other[:1]
    else:
        other.append(Site("fc3", "output", "standard", 0.1))
    assert DropoutPlan(other) != DropoutPlan(base)
    assert DropoutPlan(other).digest() != DropoutPlan(base).digest()


# ----------------------------------------------------------------------------------------------------------
# Per-site rate schedules (`rates`: what population-based training writes and `fit --plan` replays)
# ----------------------------------------------------------------------------------------------------------
def test_scheduled_plan_round_trips_and_gives_the_rate_of_each_epoch() -> None:
    plan = _plan().with_schedules({"conv2:output": [(0, 0.2), (15, 0.24), (30, 0.19)]})
    text = plan.to_yaml()
    assert "  rates:\n  - [0, 0.2]\n  - [15, 0.24]\n  - [30, 0.19]\n" in text  # one pair per line
    again = DropoutPlan.from_yaml(text)
    assert again == plan and again.digest() == plan.digest() and again.to_yaml() == text
    assert plan.scheduled and not _plan().scheduled
    assert plan.digest() != _plan().digest()  # the schedule is part of what the plan is
    site = again["conv2:output"]
    assert site.p == 0.2
    assert [site.rate_at(e) for e in (0, 14, 15, 29, 30, 99)] == [0.2, 0.2, 0.24, 0.24, 0.19, 0.19]
    assert again["rnn:input"].rates is None and again["rnn:input"].rate_at(40) == 0.3
    # a plan without schedules is written exactly as before: no `rates` key anywhere
    assert "rates" not in _plan().to_yaml() and DropoutPlan.from_yaml(_plan().to_yaml()) == _plan()
    # hand-written: `p` may be left to the schedule's first entry
    written = DropoutPlan.from_yaml(
        "sites:\n- {target: fc, variant: standard, rates: [[0, 0.1], [3, 0.3]]}\n"
    )
    assert written["fc:output"].p == 0.1 and written["fc:output"].rates == ((0, 0.1), (3, 0.3))


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        pytest.param([[1, 0.1]], "must start at epoch 0 with the site's rate p=0.1", id="no-epoch-0"),
        pytest.param([[0, 0.1], [0, 0.2]], "epochs must strictly increase", id="not-increasing"),
        pytest.param([[0, 0.1], [2.5, 0.2]], "integers >= 0, but got epoch=2.5", id="fractional-epoch"),
        pytest.param([[0, 0.1], [2, 1.5]], "0 <= rates[].rate < 1", id="rate-out-of-range"),
        pytest.param([[0, 0.1, 3]], "[epoch, rate] pairs, but got the entry [0, 0.1, 3]", id="triple"),
        pytest.param([], "non-empty list of [epoch, rate] pairs", id="empty"),
    ],
)
def test_bad_rate_schedules_are_refused_naming_the_rule(rates: object, expected: str) -> None:
    with pytest.raises(DropoutConfigError) as info:
        DropoutPlan.from_dict({"sites": [{"target": "fc", "variant": "standard", "p": 0.1, "rates": rates}]})
    assert expected in str(info.value) and "plan.sites[0]" in str(info.value)


def test_a_learned_rate_takes_no_schedule() -> None:
    with pytest.raises(DropoutConfigError, match="variant 'concrete' learns its rate"):
        Site("fc", "input", "concrete", 0.1, rates=((0, 0.1), (2, 0.2)))
