"""User labels on nodes and label selectors: the one pure parser (no I/O, no database).

Labels follow Kubernetes' syntax so that people can reuse what they know:

* a key is ``[PREFIX/]NAME``: NAME is 1–63 characters, alphanumeric at both ends, ``-_.`` and alphanumerics
  between; the optional PREFIX is a DNS subdomain (lowercase, dot-separated labels, ≤ 253 characters);
* a value is empty or like NAME (≤ 63 characters, alphanumeric at both ends).

``parse_label_changes(["env=prod", "rack-"])`` reads ``fleetctl label NODE …`` arguments; ``parse_label_selector``
reads ``-l 'env=prod,tier!=db,zone in (a,b),gpu notin (t4),canary,!draining'`` into a ``LabelSelector`` whose
``matches(labels)`` the registry applies (controller/registry.py, the labels' owner). As in Kubernetes, ``k!=v``
and ``k notin (…)`` also match a node without the key; ``k=v``, ``k in (…)`` and ``k`` need it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleetctl.fleet.errors import UsageError

_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_PREFIX_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_SYNTAX_HINT = ("label keys are [prefix/]name and values are empty or a name: a name is 1-63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit; a prefix is a DNS subdomain "
                "(e.g. example.com/rack=r12)")
SELECTOR_HINT = ("a label selector is comma-separated terms: k=v, k==v, k!=v, 'k in (a,b)', 'k notin (a)', "
                 "k (has the label), !k (has not), e.g. -l 'env=prod,zone in (a,b),!draining'")


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if not key:
        return "the key is empty"
    if slash:
        if not prefix:
            return f"key {key!r} has an empty prefix before '/'"
        if len(prefix) > 253 or not _PREFIX_RE.fullmatch(prefix):
            return f"key prefix {prefix!r} is not a DNS subdomain (lowercase letters, digits, '-' and '.', ≤ 253)"
    if len(name) > 63:
        return f"key name {name!r} is longer than 63 characters"
    if not _NAME_RE.fullmatch(name):
        return f"key {key!r} is not [prefix/]name (name: letters, digits, '-', '_', '.'; alphanumeric at both ends)"
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None (the empty value is valid)."""
    if not value:
        return None
    if len(value) > 63:
        return f"value {value!r} is longer than 63 characters"
    if not _NAME_RE.fullmatch(value):
        return f"value {value!r} is not a name (letters, digits, '-', '_', '.'; alphanumeric at both ends)"
    return None


def check_label(key: str, value: str) -> None:
    """Raise ``UsageError`` naming what is wrong with ``key=value``."""
    why = label_key_error(key) or label_value_error(value)
    if why:
        raise UsageError(f"bad label {key}={value}: {why}", hint=_SYNTAX_HINT)


@dataclass(frozen=True)
class LabelChanges:
    """``fleetctl label`` arguments: labels to set (key → value) and keys to remove."""

    set: Mapping[str, str]
    remove: tuple[str, ...]


def parse_label_changes(args: Sequence[str]) -> LabelChanges:
    """``["env=prod", "rack-"]`` → set env=prod, remove rack. A key both set and removed is refused."""
    if not args:
        raise UsageError("no label changes given",
                         hint="e.g. `fleetctl label NODE env=prod rack-` (k=v sets, k- removes)")
    to_set: dict[str, str] = {}
    remove: list[str] = []
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            check_label(key, value)
            to_set[key] = value
        elif arg.endswith("-"):
            key = arg[:-1]
            why = label_key_error(key)
            if why:
                raise UsageError(f"bad label removal {arg!r}: {why}", hint=_SYNTAX_HINT)
            remove.append(key)
        else:
            raise UsageError(f"bad label change {arg!r}: neither KEY=VALUE nor KEY-",
                             hint="KEY=VALUE sets a label (an empty value is allowed), KEY- removes it")
    both = sorted(set(to_set) & set(remove))
    if both:
        raise UsageError(f"label {both[0]!r} is both set and removed", hint="give each key once")
    return LabelChanges(to_set, tuple(dict.fromkeys(remove)))


class Op(enum.StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op is Op.EXISTS:
            return present
        if self.op is Op.NOT_EXISTS:
            return not present
        if self.op in (Op.EQUALS, Op.IN):
            return present and value in self.values
        return not present or value not in self.values  # != and notin: a node without the key matches

    def __str__(self) -> str:
        if self.op is Op.EXISTS:
            return self.key
        if self.op is Op.NOT_EXISTS:
            return f"!{self.key}"
        if self.op in (Op.EQUALS, Op.NOT_EQUALS):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


@dataclass(frozen=True)
class LabelSelector:
    """Parsed ``-l``: every requirement must hold (empty: every node)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)

    def __str__(self) -> str:
        """The canonical text: parses back to an equal selector."""
        return ",".join(str(r) for r in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses; unbalanced parentheses are refused."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth > 1:
                raise UsageError(f"nested '(' in label selector {text!r}", hint=SELECTOR_HINT)
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unmatched ')' in label selector {text!r}", hint=SELECTOR_HINT)
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"unclosed '(' in label selector {text!r}", hint=SELECTOR_HINT)
    terms.append(text[start:])
    return terms


_SET_RE = re.compile(r"(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")


def _requirement(term: str, text: str) -> Requirement:
    def key_ok(key: str) -> str:
        why = label_key_error(key)
        if why:
            raise UsageError(f"bad term {term!r} in label selector {text!r}: {why}", hint=SELECTOR_HINT)
        return key

    def values_ok(values: Iterable[str]) -> tuple[str, ...]:
        out = tuple(v.strip() for v in values)
        for v in out:
            why = label_value_error(v)
            if why:
                raise UsageError(f"bad term {term!r} in label selector {text!r}: {why}", hint=SELECTOR_HINT)
        return out

    found = _SET_RE.fullmatch(term)
    if found:
        values = found["values"].split(",")
        if not found["values"].strip():
            raise UsageError(f"bad term {term!r} in label selector {text!r}: the value list is empty",
                             hint=SELECTOR_HINT)
        return Requirement(key_ok(found["key"]), Op(found["op"]), tuple(dict.fromkeys(values_ok(values))))
    for symbol, op in (("!=", Op.NOT_EQUALS), ("==", Op.EQUALS), ("=", Op.EQUALS)):
        if symbol in term:
            key, _, value = term.partition(symbol)
            if "=" in value:
                raise UsageError(f"bad term {term!r} in label selector {text!r}: more than one '='",
                                 hint=SELECTOR_HINT)
            return Requirement(key_ok(key.strip()), op, values_ok([value]))
    if term.startswith("!"):
        return Requirement(key_ok(term[1:].strip()), Op.NOT_EXISTS)
    if "(" in term or ")" in term or " " in term:
        raise UsageError(f"bad term {term!r} in label selector {text!r}: not k=v, k!=v, k in (…), k notin (…), "
                         f"k or !k", hint=SELECTOR_HINT)
    return Requirement(key_ok(term), Op.EXISTS)


def parse_label_selector(text: str | None) -> LabelSelector:
    """``"env=prod,zone in (a,b),!draining"`` → LabelSelector; None or blank selects every node."""
    if text is None or not text.strip():
        return LabelSelector()
    requirements = []
    for raw in _split_terms(text):
        term = raw.strip()
        if not term:
            raise UsageError(f"empty term in label selector {text!r}", hint=SELECTOR_HINT)
        requirements.append(_requirement(term, text))
    return LabelSelector(tuple(requirements))
