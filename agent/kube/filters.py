"""Which containers, and which of their streams, are captured.

A container is captured unless one of these excludes it, checked in this order:

1. its namespace does not match ``include_namespaces`` (when not empty) or matches
   ``exclude_namespaces`` (shell-style globs, ``fnmatch`` rules, case-sensitive);
2. its pod's labels do not match ``include_pod_labels`` (when not empty) or match
   ``exclude_pod_labels`` (when not empty), both Kubernetes label selectors;
3. a pod annotation, value ``"true"`` (any case):
   ``podtap.io/exclude`` excludes the whole pod,
   ``podtap.io/exclude-<container name>`` excludes that container.

Streams: ``filters.stdout``/``filters.stderr`` switch a stream off everywhere, and the pod
annotations ``podtap.io/exclude-stdout`` / ``podtap.io/exclude-stderr`` switch it off for
the pod. These two keys always mean streams, so containers named ``stdout`` or ``stderr``
cannot be excluded by name. Annotation key names are limited to 63 characters, so the
per-container form only works for container names of up to 55 characters.

``exclude_namespaces`` is empty by default: system namespaces such as ``kube-system`` are
captured unless the configuration says otherwise.

Label selectors use the syntax of ``kubectl -l``: requirements separated by commas, all
of which must hold: ``k=v``, ``k==v``, ``k!=v``, ``k in (v1,v2)``, ``k notin (v1,v2)``,
``k`` (exists), ``!k`` (does not exist), ``k>n`` and ``k<n`` (integer comparison). As in
Kubernetes, ``!=`` and ``notin`` also hold when the label is absent.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import FiltersConfig
from agent.kube.model import ContainerMeta

__all__ = [
    "ANNOTATION_PREFIX",
    "Filters",
    "FilterError",
    "Requirement",
    "Selector",
    "decide",
    "parse_selector",
]

ANNOTATION_PREFIX = "podtap.io/"
_EXCLUDE_POD = ANNOTATION_PREFIX + "exclude"
_EXCLUDE_STDOUT = ANNOTATION_PREFIX + "exclude-stdout"
_EXCLUDE_STDERR = ANNOTATION_PREFIX + "exclude-stderr"
_EXCLUDE_CONTAINER = ANNOTATION_PREFIX + "exclude-"


class FilterError(ValueError):
    """A filter configuration that cannot be used, e.g. a malformed label selector."""


# --- label selectors ---------------------------------------------------------------------

_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_OPERATORS = ("==", "!=", "=", "!", "(", ")", ",", "<", ">")
_SET_OPERATORS = ("in", "notin")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement of a selector; ``op`` is one of
    ``= != in notin exists !exists > <``."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        if self.op in ("!=", "notin"):
            return value is None or value not in self.values
        return _compares(value, self.op, int(next(iter(self.values))))


def _compares(value: str | None, op: str, bound: int) -> bool:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return False
    if number is None:
        return False
    return number > bound if op == ">" else number < bound


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed label selector; the empty selector matches every label set."""

    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    pos: int
    is_operator: bool


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
        if operator:
            tokens.append(_Token(operator, i, True))
            i += len(operator)
            continue
        start = i
        while i < len(text) and not text[i].isspace() and text[i] not in "=!(),<>":
            i += 1
        tokens.append(_Token(text[start:i], start, False))
    return tokens


class _Parser:
    """Recursive-descent parser of one selector string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, reason: str, pos: int | None = None) -> FilterError:
        if pos is None:
            pos = self.tokens[self.i].pos if self.i < len(self.tokens) else len(self.text)
        return FilterError(f"invalid label selector {self.text!r}: {reason} at position {pos}")

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> _Token | None:
        token = self.peek()
        if token is not None:
            self.i += 1
        return token

    def expect_operator(self, text: str) -> None:
        token = self.take()
        if token is None or not token.is_operator or token.text != text:
            found = repr(token.text) if token else "end of selector"
            raise self.error(f"expected {text!r}, found {found}", token.pos if token else None)

    def parse(self) -> tuple[Requirement, ...]:
        if self.peek() is None:
            return ()
        requirements = [self.requirement()]
        while self.peek() is not None:
            self.expect_operator(",")
            requirements.append(self.requirement())
        return tuple(requirements)

    def key(self) -> str:
        token = self.take()
        if token is None or token.is_operator:
            raise self.error("expected a label key", token.pos if token else None)
        _check_key(token.text, lambda reason: self.error(reason, token.pos))
        return token.text

    def requirement(self) -> Requirement:
        token = self.peek()
        if token is not None and token.is_operator and token.text == "!":
            self.take()
            return Requirement(self.key(), "!exists")
        key = self.key()
        token = self.peek()
        if token is None or (token.is_operator and token.text == ","):
            return Requirement(key, "exists")
        self.take()
        if token.is_operator and token.text in ("=", "==", "!="):
            return Requirement(key, "!=" if token.text == "!=" else "=", frozenset([self.value()]))
        if token.is_operator and token.text in ("<", ">"):
            return Requirement(key, token.text, frozenset([self.integer()]))
        if not token.is_operator and token.text in _SET_OPERATORS:
            return Requirement(key, token.text, self.value_set())
        raise self.error(f"expected an operator after {key!r}, found {token.text!r}", token.pos)

    def value(self) -> str:
        token = self.peek()
        if token is None or (token.is_operator and token.text in (",", ")")):
            return ""  # "k=" means: k is set to the empty string
        self.take()
        if token.is_operator:
            raise self.error(f"expected a label value, found {token.text!r}", token.pos)
        _check_value(token.text, lambda reason: self.error(reason, token.pos))
        return token.text

    def integer(self) -> str:
        token = self.take()
        if token is None or token.is_operator or not re.fullmatch(r"-?[0-9]+", token.text):
            raise self.error("expected an integer", token.pos if token else None)
        return token.text

    def value_set(self) -> frozenset[str]:
        self.expect_operator("(")
        token = self.peek()
        if token is not None and token.is_operator and token.text == ")":
            raise self.error("empty value set")
        values = [self.value()]
        while (token := self.peek()) is not None and token.is_operator and token.text == ",":
            self.take()
            values.append(self.value())
        self.expect_operator(")")
        return frozenset(values)


def _check_key(key: str, fail: Callable[[str], FilterError]) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise fail(f"invalid label key prefix {prefix!r} (must be a DNS subdomain)")
    if len(name) > 63 or not _NAME.fullmatch(name):
        raise fail(
            f"invalid label key name {name!r} (at most 63 characters, alphanumerics "
            "and '-', '_', '.', starting and ending with an alphanumeric)"
        )


def _check_value(value: str, fail: Callable[[str], FilterError]) -> None:
    if len(value) > 63 or not _NAME.fullmatch(value):
        raise fail(
            f"invalid label value {value!r} (at most 63 characters, alphanumerics "
            "and '-', '_', '.', starting and ending with an alphanumeric)"
        )


def parse_selector(text: str) -> Selector:
    """Parses a Kubernetes label selector; raises FilterError naming the offending text."""
    return Selector(text, _Parser(text).parse())


# --- configuration -----------------------------------------------------------------------


def _compile_globs(globs: Sequence[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


class Filters:
    """The `filters` section compiled: namespace globs to one pattern each, selectors
    parsed. Raises FilterError for a malformed one (see the module docstring)."""

    __slots__ = ("_exclude_labels", "_exclude_ns", "_include_labels", "_include_ns",
                 "exclude_namespaces", "include_namespaces", "stderr", "stdout")

    def __init__(self, cfg: FiltersConfig) -> None:
        for name in ("include_namespaces", "exclude_namespaces"):
            globs = getattr(cfg, name)
            if isinstance(globs, str):
                raise FilterError(f"{name} must be a list of globs, not the string {globs!r}")
        self.include_namespaces = tuple(cfg.include_namespaces)
        self.exclude_namespaces = tuple(cfg.exclude_namespaces)
        self.stdout = cfg.stdout
        self.stderr = cfg.stderr
        self._include_ns = _compile_globs(self.include_namespaces)
        self._exclude_ns = _compile_globs(self.exclude_namespaces)
        self._include_labels = parse_selector(cfg.include_pod_labels)
        self._exclude_labels = parse_selector(cfg.exclude_pod_labels)

    @classmethod
    def of(cls, **fields: Any) -> Filters:
        """Filters from the keys of the `filters` section."""
        return cls(FiltersConfig(**fields))

    def namespace_selected(self, namespace: str) -> bool:
        if self._include_ns is not None and not self._include_ns.fullmatch(namespace):
            return False
        return self._exclude_ns is None or not self._exclude_ns.fullmatch(namespace)

    def labels_selected(self, labels: Mapping[str, str]) -> bool:
        if self._include_labels and not self._include_labels.matches(labels):
            return False
        return not (self._exclude_labels and self._exclude_labels.matches(labels))


def _annotation_true(annotations: Mapping[str, str], key: str) -> bool:
    return annotations.get(key, "").strip().lower() == "true"


def _excluded_by_annotation(meta: ContainerMeta) -> bool:
    annotations = meta.annotations
    if _annotation_true(annotations, _EXCLUDE_POD):
        return True
    container_key = _EXCLUDE_CONTAINER + meta.container_name
    if container_key in (_EXCLUDE_STDOUT, _EXCLUDE_STDERR):
        return False  # these keys switch streams off, see the module docstring
    return _annotation_true(annotations, container_key)


def decide(meta: ContainerMeta, cfg: Filters) -> tuple[bool, bool]:
    """(capture stdout, capture stderr) for this container; (False, False) if excluded."""
    if (
        not cfg.namespace_selected(meta.namespace)
        or not cfg.labels_selected(meta.labels)
        or _excluded_by_annotation(meta)
    ):
        return False, False
    stdout = cfg.stdout and not _annotation_true(meta.annotations, _EXCLUDE_STDOUT)
    stderr = cfg.stderr and not _annotation_true(meta.annotations, _EXCLUDE_STDERR)
    return stdout, stderr
