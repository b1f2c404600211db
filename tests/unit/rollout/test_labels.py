"""The label parser (controller/labels.py): label syntax, ``fleetctl label`` changes, selectors (table + properties)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetctl.controller.labels import (
    LabelSelector,
    Op,
    Requirement,
    check_label,
    parse_label_changes,
    parse_label_selector,
)
from fleetctl.controller.rollout.core import NodeInfo, parse_selector, select_nodes, selection_text
from fleetctl.fleet.errors import UsageError

NODE = {"env": "prod", "zone": "a", "canary": "", "example.com/rack": "r12"}


@pytest.mark.parametrize(("text", "expected"), [
    ("", True), ("env=prod", True), ("env==prod", True), ("env=dev", False), ("env!=dev", True),
    ("env!=prod", False), ("missing!=x", True), ("zone in (a,b)", True), ("zone in (b, c)", False),
    ("zone notin (b)", True), ("zone notin (a)", False), ("missing notin (a)", True), ("missing in (a)", False),
    ("canary", True), ("!canary", False), ("!missing", True), ("missing", False), ("canary=", True),
    ("example.com/rack=r12", True), ("env=prod,zone in (a,b),!draining", True), ("env=prod,zone=b", False),
    (" env = prod , zone in ( a , b ) ", True),
])
def test_selector_matches_like_kubernetes(text: str, expected: bool) -> None:
    assert parse_label_selector(text).matches(NODE) is expected


def test_selector_parses_into_requirements() -> None:
    sel = parse_label_selector("env=prod,tier!=db,zone in (a,b),gpu notin (t4),canary,!draining")
    assert sel.requirements == (
        Requirement("env", Op.EQUALS, ("prod",)), Requirement("tier", Op.NOT_EQUALS, ("db",)),
        Requirement("zone", Op.IN, ("a", "b")), Requirement("gpu", Op.NOT_IN, ("t4",)),
        Requirement("canary", Op.EXISTS), Requirement("draining", Op.NOT_EXISTS))
    assert str(sel) == "env=prod,tier!=db,zone in (a,b),gpu notin (t4),canary,!draining"


@pytest.mark.parametrize(("text", "says"), [
    ("env=prod,,zone=a", "empty term"), ("zone in (a,b", "unclosed '('"), ("zone in a,b)", "unmatched ')'"),
    ("zone in ()", "value list is empty"), ("zone in ((a))", "nested"), ("-env=x", "not [prefix/]name"),
    ("env=prod=x", "more than one '='"), ("env=no spaces", "not a name"), ("Bad_Prefix/x=1", "DNS subdomain"),
    ("zone within (a)", "not k=v"), ("k=" + "v" * 64, "longer than 63"), ("/k=v", "empty prefix"),
])
def test_selector_errors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_label_selector(text)
    assert says in err.value.message
    assert err.value.hint and "k in (a,b)" in err.value.hint


def test_label_changes_set_and_remove() -> None:
    changes = parse_label_changes(["env=prod", "canary=", "rack-", "example.com/zone=a"])
    assert dict(changes.set) == {"env": "prod", "canary": "", "example.com/zone": "a"}
    assert changes.remove == ("rack",)


@pytest.mark.parametrize(("args", "says"), [
    ([], "no label changes"), (["env"], "neither KEY=VALUE nor KEY-"), (["env=a b"], "not a name"),
    (["-="], "not [prefix/]name"), (["env=x", "env-"], "both set and removed"), (["x" * 64 + "=1"], "longer than 63"),
    (["-"], "the key is empty"),
])
def test_label_changes_refused_with_reason(args: list[str], says: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_label_changes(args)
    assert says in err.value.message


def test_check_label_hint_shows_the_syntax() -> None:
    with pytest.raises(UsageError) as err:
        check_label("a/b/c", "x")
    assert "prefix" in (err.value.hint or "")


# ---- properties ---------------------------------------------------------------------------------------------

_alnum = st.sampled_from("abcxyzAZ0189")
names = st.builds(lambda a, mid, b: a + mid + b, _alnum, st.text("ab-_.9", max_size=8), _alnum) | _alnum
keys = names | st.builds(lambda p, n: f"{p}.io/{n}", st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), names)
values = st.just("") | names
requirements = st.one_of(
    st.builds(lambda k, v: Requirement(k, Op.EQUALS, (v,)), keys, values),
    st.builds(lambda k, v: Requirement(k, Op.NOT_EQUALS, (v,)), keys, values),
    st.builds(lambda k, vs: Requirement(k, Op.IN, tuple(dict.fromkeys(vs))), keys,
              st.lists(names, min_size=1, max_size=3)),
    st.builds(lambda k, vs: Requirement(k, Op.NOT_IN, tuple(dict.fromkeys(vs))), keys,
              st.lists(names, min_size=1, max_size=3)),
    st.builds(lambda k: Requirement(k, Op.EXISTS), keys),
    st.builds(lambda k: Requirement(k, Op.NOT_EXISTS), keys),
)
selectors = st.lists(requirements, max_size=5).map(lambda rs: LabelSelector(tuple(rs)))
label_sets = st.dictionaries(keys, values, max_size=5)


@given(selectors)
def test_canonical_text_parses_back_to_the_same_selector(sel: LabelSelector) -> None:
    assert parse_label_selector(str(sel)) == sel


@given(selectors, label_sets)
def test_a_selector_matches_exactly_when_every_term_does(sel: LabelSelector, labels: dict[str, str]) -> None:
    assert sel.matches(labels) == all(parse_label_selector(str(r)).matches(labels) for r in sel.requirements)


@given(keys, values, label_sets)
def test_equals_and_not_equals_are_complements(key: str, value: str, labels: dict[str, str]) -> None:
    eq, ne = parse_label_selector(f"{key}={value}"), parse_label_selector(f"{key}!={value}")
    assert eq.matches(labels) != ne.matches(labels)
    assert parse_label_selector(key).matches(labels) != parse_label_selector(f"!{key}").matches(labels)


@given(st.text(max_size=30))
def test_any_text_parses_or_is_a_usage_error(text: str) -> None:
    try:
        parse_label_selector(text)
    except UsageError as exc:
        assert exc.hint


# ---- the whole selection: --nodes and -l in one stored text (rollout.core) ------------------------------------

@given(st.sampled_from([None, "all", "gpu=H100", "node-*,status=online", "gpu=RTX 4090,profile=t4"]), selectors)
def test_the_stored_selection_text_parses_back_to_the_same_selection(nodes: str | None, sel: LabelSelector) -> None:
    chosen = parse_selector(nodes, str(sel))
    again = parse_selector(selection_text(nodes, str(sel)))
    assert (again.terms, again.labels, again.text) == (chosen.terms, chosen.labels, chosen.text)
    assert again.labels == sel


def test_nodes_and_labels_are_anded() -> None:
    prod_h100 = NodeInfo("a", "NVIDIA H100 80GB HBM3", labels={"env": "prod"})
    dev_h100 = NodeInfo("b", "NVIDIA H100 80GB HBM3", labels={"env": "dev"})
    prod_a100 = NodeInfo("c", "NVIDIA A100-SXM4-80GB", labels={"env": "prod"})
    chosen = select_nodes(parse_selector("gpu=H100", "env=prod"), [prod_h100, dev_h100, prod_a100])
    assert [n.hostname for n in chosen] == ["a"]
    assert selection_text("gpu=H100", "env=prod") == "gpu=H100 -l env=prod"
    assert selection_text(None, " ") is None and selection_text("x", None) == "x"
    with pytest.raises(UsageError, match="two label selectors"):
        parse_selector("all -l env=prod", "env=dev")
    with pytest.raises(UsageError, match="matches no node"):
        select_nodes(parse_selector(None, "env=nowhere"), [prod_h100])
