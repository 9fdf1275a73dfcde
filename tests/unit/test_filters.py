"""Tests of agent.kube.filters: namespace globs, label selectors, annotations, streams."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.kube.filters import FilterError, Filters, Requirement, decide, parse_selector
from agent.kube.model import ContainerMeta

META = ContainerMeta(
    namespace="shop",
    pod_name="web-1",
    pod_uid="uid-1",
    container_name="app",
    container_id="c" * 64,
    runtime="containerd",
    image="web:1",
    host="node-1",
    qos_class="burstable",
    labels={"app": "web", "tier": "front", "replicas": "3", "example.com/team": "a"},
)

BOTH = (True, True)
NONE = (False, False)


def meta_with(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> ContainerMeta:
    return replace(
        META,
        labels=META.labels if labels is None else labels,
        annotations=annotations or {},
    )


# --- label selectors ---------------------------------------------------------------------

LABELS = {"app": "web", "tier": "front", "replicas": "3", "example.com/team": "a", "empty": ""}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("missing=web", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),  # absent labels satisfy != (Kubernetes semantics)
        ("app in (web,db)", True),
        ("app in (db)", False),
        ("missing in (web)", False),
        ("app notin (db, cache)", True),
        ("app notin (web)", False),
        ("missing notin (web)", True),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("replicas>2", True),
        ("replicas>3", False),
        ("replicas<4", True),
        ("replicas<3", False),
        ("app>1", False),  # not an integer: no match
        ("missing<10", False),
        ("replicas>-1", True),
        ("example.com/team=a", True),
        ("example.com/team in (b)", False),
        ("empty=", True),
        ("empty", True),
        ("app=", False),
        ("empty in (,x)", True),
        ("app=web,tier=front", True),
        ("app=web,tier=back", False),
        ("app=web, tier in (front), !missing, replicas, app notin (db)", True),
        ("  app = web  ", True),
        ("in=web", False),  # a key named like a keyword
    ],
)
def test_selector_operators(selector: str, expected: bool) -> None:
    assert parse_selector(selector).matches(LABELS) is expected


def test_selector_structure() -> None:
    parsed = parse_selector("a=b,c!=d,e in (x,y),f notin (z),g,!h")
    assert parsed.requirements == (
        Requirement("a", "=", frozenset({"b"})),
        Requirement("c", "!=", frozenset({"d"})),
        Requirement("e", "in", frozenset({"x", "y"})),
        Requirement("f", "notin", frozenset({"z"})),
        Requirement("g", "exists"),
        Requirement("h", "!exists"),
    )
    assert parsed.text == "a=b,c!=d,e in (x,y),f notin (z),g,!h"


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("a in (x", "expected ')'"),
        ("a in x", "expected '('"),
        ("a in ()", "empty value set"),
        ("a notin", "expected '('"),
        ("a=b=c", "expected ','"),
        ("a b", "expected an operator after 'a'"),
        ("a=b,", "expected a label key"),
        (",a", "expected a label key"),
        ("=b", "expected a label key"),
        ("!", "expected a label key"),
        ("a=(b)", "expected a label value"),
        ("a>b", "expected an integer"),
        ("a<", "expected an integer"),
        ("-a=b", "invalid label key name '-a'"),
        ("a" * 64 + "=b", "at most 63 characters"),
        ("a=" + "b" * 64, "invalid label value"),
        ("a=b$", "invalid label value 'b$'"),
        ("Bad_Prefix/a=b", "invalid label key prefix 'Bad_Prefix'"),
        ("/a=b", "invalid label key prefix ''"),
        ("a in (x,,y", "expected ')'"),
    ],
)
def test_bad_selectors_rejected(selector: str, message: str) -> None:
    with pytest.raises(FilterError, match="invalid label selector") as error:
        parse_selector(selector)
    text = str(error.value)
    assert message in text
    assert repr(selector) in text
    assert "at position" in text


def test_bad_selector_rejected_at_config_time() -> None:
    with pytest.raises(FilterError, match=r"'app in \(web'"):
        Filters.of(include_pod_labels="app in (web")
    with pytest.raises(FilterError, match="'tier==,'"):
        Filters.of(exclude_pod_labels="tier==,")


def test_error_position_points_at_the_problem() -> None:
    with pytest.raises(FilterError, match="at position 8"):
        parse_selector("app=web tier=front")


# --- namespaces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("include", "exclude", "namespace", "captured"),
    [
        ([], [], "shop", True),
        (["shop"], [], "shop", True),
        (["shop"], [], "shop-dev", False),
        (["shop*"], [], "shop-dev", True),
        (["team-?"], [], "team-a", True),
        (["team-?"], [], "team-ab", False),
        (["team-[ab]"], [], "team-b", True),
        (["a", "b*"], [], "bee", True),
        ([], ["kube-*"], "kube-system", False),
        ([], ["kube-*"], "default", True),
        (["*"], ["kube-system"], "kube-system", False),  # exclusion wins
        (["*"], ["kube-system"], "kube-public", True),
        (["Shop"], [], "shop", False),  # case-sensitive, like namespace names
        (["sh.p"], [], "shop", False),  # regex characters are literal
    ],
)
def test_namespace_globs(
    include: list[str], exclude: list[str], namespace: str, captured: bool
) -> None:
    cfg = Filters.of(include_namespaces=include, exclude_namespaces=exclude)
    assert decide(replace(META, namespace=namespace), cfg) == (BOTH if captured else NONE)


def test_namespace_globs_must_be_a_list() -> None:
    with pytest.raises(FilterError, match="list of globs"):
        Filters.of(include_namespaces="shop")


def test_config_lists_are_frozen_copies() -> None:
    globs = ["shop"]
    cfg = Filters.of(include_namespaces=globs)
    globs.append("other")
    assert cfg.include_namespaces == ("shop",)
    assert decide(replace(META, namespace="other"), cfg) == NONE


def test_defaults_capture_everything() -> None:
    cfg = Filters.of()
    assert cfg.exclude_namespaces == ()
    assert decide(replace(META, namespace="kube-system"), cfg) == BOTH


# --- pod labels --------------------------------------------------------------------------


def test_include_and_exclude_pod_labels() -> None:
    cfg = Filters.of(include_pod_labels="app in (web, api)", exclude_pod_labels="tier=debug")
    assert decide(META, cfg) == BOTH
    assert decide(meta_with({"app": "db"}), cfg) == NONE
    assert decide(meta_with({"app": "api", "tier": "debug"}), cfg) == NONE
    assert decide(meta_with({}), cfg) == NONE


def test_empty_exclude_selector_excludes_nothing() -> None:
    assert decide(META, Filters.of(exclude_pod_labels="")) == BOTH
    assert decide(meta_with({}), Filters.of(exclude_pod_labels="  ")) == BOTH


def test_exclude_by_absent_label() -> None:
    cfg = Filters.of(exclude_pod_labels="!logging")
    assert decide(meta_with({"logging": "on"}), cfg) == BOTH
    assert decide(meta_with({}), cfg) == NONE


# --- annotations -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "True", "TRUE", " true "])
def test_exclude_pod_annotation(value: str) -> None:
    assert decide(meta_with(annotations={"podtap.io/exclude": value}), Filters.of()) == NONE


@pytest.mark.parametrize("value", ["false", "", "yes", "1"])
def test_exclude_annotation_needs_true(value: str) -> None:
    assert decide(meta_with(annotations={"podtap.io/exclude": value}), Filters.of()) == BOTH


def test_exclude_container_annotation() -> None:
    meta = meta_with(annotations={"podtap.io/exclude-app": "true"})
    assert decide(meta, Filters.of()) == NONE
    assert decide(replace(meta, container_name="sidecar"), Filters.of()) == BOTH


def test_annotations_of_other_tools_are_ignored() -> None:
    assert decide(meta_with(annotations={"fluentbit.io/exclude": "true"}), Filters.of()) == BOTH


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"podtap.io/exclude-stdout": "true"}, (False, True)),
        ({"podtap.io/exclude-stderr": "true"}, (True, False)),
        ({"podtap.io/exclude-stdout": "true", "podtap.io/exclude-stderr": "true"}, NONE),
        ({"podtap.io/exclude-stdout": "false"}, BOTH),
    ],
)
def test_stream_annotations(annotations: dict[str, str], expected: tuple[bool, bool]) -> None:
    assert decide(meta_with(annotations=annotations), Filters.of()) == expected


def test_stream_annotation_does_not_exclude_a_container_named_stdout() -> None:
    meta = replace(
        meta_with(annotations={"podtap.io/exclude-stdout": "true"}), container_name="stdout"
    )
    assert decide(meta, Filters.of()) == (False, True)


# --- stream toggles ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "stderr"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_stream_toggles(stdout: bool, stderr: bool) -> None:
    assert decide(META, Filters.of(stdout=stdout, stderr=stderr)) == (stdout, stderr)


def test_stream_toggle_and_annotation_combine() -> None:
    cfg = Filters.of(stderr=False)
    assert decide(meta_with(annotations={"podtap.io/exclude-stdout": "true"}), cfg) == NONE


def test_excluded_pod_ignores_stream_toggles() -> None:
    cfg = Filters.of(exclude_namespaces=["shop"], stdout=True, stderr=True)
    assert decide(META, cfg) == NONE
