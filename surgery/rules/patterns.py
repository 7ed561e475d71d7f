"""Regular expressions matched in linear time, for patterns that come from files (HF PEFT's `target_modules`,
`rank_pattern`, `alpha_pattern`, `exclude_modules`).

Python's `re` backtracks: `(.|.)*Q` against a module name takes exponential time. `Pattern` compiles the common
subset of the syntax to a Thompson NFA and simulates it, so matching costs O(len(pattern) x len(text)) whatever
the pattern: literals and escapes, `.`, classes `[...]` (ranges, negation, `\\d \\w \\s` and their negations),
groups `(...)`, `(?:...)`, `(?P<name>...)`, alternation `|`, the quantifiers `* + ? {m} {m,} {m,n}` (lazy forms
match the same strings) and the anchors `^ $ \\A \\Z`. Anything else (back-references, look-arounds, inline flags)
is refused with `PatternError`, as are patterns longer than `MAX_LENGTH` or compiling to more than `MAX_STATES`
states (counted repetition is expanded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from surgery.errors import PatternError

MAX_LENGTH = 1000
"""Longest pattern accepted (characters)."""
MAX_STATES = 20_000
"""Most NFA states a pattern may compile to."""


_DIGIT = frozenset("0123456789")
_SPACE = frozenset(" \t\n\r\f\v")


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CLASSES: dict[str, Callable[[str], bool]] = {
    "d": lambda c: c in _DIGIT or c.isdigit(), "D": lambda c: not (c in _DIGIT or c.isdigit()),
    "w": _word, "W": lambda c: not _word(c),
    "s": lambda c: c in _SPACE or c.isspace(), "S": lambda c: not (c in _SPACE or c.isspace()),
}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


# ---- parsing to a small tree ------------------------------------------------------------------------------------

@dataclass
class _Node:
    kind: str  # "char", "seq", "alt", "repeat", "bol", "eol"
    test: Callable[[str], bool] | None = None
    literal: str | None = None
    items: list["_Node"] = field(default_factory=list)
    low: int = 0
    high: int | None = None


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, what: str) -> PatternError:
        return PatternError(f"pattern {self.p!r}: {what} at position {self.i} (supported: literals, ., [...], groups, "
                            "|, * + ? {m,n}, ^ $)")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self) -> _Node:
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self) -> _Node:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.take()
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else _Node("alt", items=branches)

    def sequence(self) -> _Node:
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.quantified(self.atom()))
        return _Node("seq", items=items)

    def quantified(self, atom: _Node) -> _Node:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.take()
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and self._counted():
            low, high = self._counted(consume=True)
        else:
            return atom
        if atom.kind in ("bol", "eol"):
            raise self.error("a quantifier after an anchor")
        if self.peek() == "?":  # lazy: matches the same strings
            self.take()
        elif self.peek() in ("*", "+", "?", "{") and (self.peek() != "{" or self._counted()):
            raise self.error("a quantifier after a quantifier")
        return _Node("repeat", items=[atom], low=low, high=high)

    def _counted(self, consume: bool = False):
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1:end]
        low, comma, high = body.partition(",")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        bounds = (int(low), None if comma and not high else int(high) if comma else int(low))
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self.error(f"the repetition {{{body}}} has its maximum below its minimum")
        if consume:
            self.i = end + 1
        return bounds

    def atom(self) -> _Node:
        c = self.take()
        if c == ".":
            return _Node("char", test=lambda ch: ch != "\n")
        if c == "^":
            return _Node("bol")
        if c == "$":
            return _Node("eol")
        if c == "(":
            if self.peek() == "?":
                self.take()
                if self.peek() == ":":
                    self.take()
                elif self.p.startswith("P<", self.i):
                    end = self.p.find(">", self.i)
                    if end < 0 or not self.p[self.i + 2:end].isidentifier():
                        raise self.error("a bad group name")
                    self.i = end + 1
                else:
                    raise self.error("an unsupported group (?...)")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("a missing ')'")
            self.take()
            return node
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape(in_class=False)
        if c in ")*+?":
            raise self.error(f"a misplaced {c!r}")
        if c == "{" and self._counted_at(self.i - 1):
            raise self.error("a repetition with nothing to repeat")
        return _Node("char", literal=c, test=lambda ch, c=c: ch == c)

    def _counted_at(self, position: int) -> bool:
        saved, self.i = self.i, position
        try:
            return bool(self._counted())
        finally:
            self.i = saved

    def escape(self, in_class: bool) -> _Node:
        if self.peek() is None:
            raise self.error("a trailing backslash")
        c = self.take()
        if c in _CLASSES:
            return _Node("char", test=_CLASSES[c])
        if not in_class and c in "AZ":
            return _Node("bol" if c == "A" else "eol")
        if c in _ESCAPES:
            ch = _ESCAPES[c]
            return _Node("char", literal=ch, test=lambda x, ch=ch: x == ch)
        if c.isalnum():
            raise self.error(f"the unsupported escape \\{c}")
        return _Node("char", literal=c, test=lambda x, c=c: x == c)

    def char_class(self) -> _Node:
        negate = self.peek() == "^"
        if negate:
            self.take()
        tests: list[Callable[[str], bool]] = []
        first = True
        while True:
            if self.peek() is None:
                raise self.error("a missing ']'")
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                node = self.escape(in_class=True)
                if node.literal is None:
                    tests.append(node.test)
                    continue
                c = node.literal
            elif c == "[" and self.peek() == ":":
                raise self.error("POSIX classes [:...:]")
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.take()
                end = self.take()
                if end == "\\":
                    node = self.escape(in_class=True)
                    if node.literal is None:
                        raise self.error("a range ending in a class")
                    end = node.literal
                if end < c:
                    raise self.error(f"the bad range {c}-{end}")
                tests.append(lambda x, a=c, b=end: a <= x <= b)
            else:
                tests.append(lambda x, c=c: x == c)
        if negate:
            return _Node("char", test=lambda x: not any(t(x) for t in tests))
        return _Node("char", test=lambda x: any(t(x) for t in tests))


# ---- compiling to an NFA ----------------------------------------------------------------------------------------

class _Nfa:
    """States: ("char", test, next), ("split", a, b), ("bol", next), ("eol", next), ("match",)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.states: list[list] = []

    def new(self, *state) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"pattern {self.pattern[:80]!r}: more than {MAX_STATES:,} states once repetitions are "
                               "expanded; too large to match in bounded time")
        self.states.append(list(state))
        return len(self.states) - 1

    def build(self, node: _Node, out: int) -> int:
        """Compile `node` so that it continues at state `out`; return its start state."""
        if node.kind == "char":
            return self.new("char", node.test, out)
        if node.kind in ("bol", "eol"):
            return self.new(node.kind, out)
        if node.kind == "seq":
            start = out
            for item in reversed(node.items):
                start = self.build(item, start)
            return start
        if node.kind == "alt":
            starts = [self.build(item, out) for item in node.items]
            start = starts[-1]
            for s in reversed(starts[:-1]):
                start = self.new("split", s, start)
            return start
        item, low, high = node.items[0], node.low, node.high
        start = out
        if high is None:  # item* after `low` copies
            loop = self.new("split", None, out)
            self.states[loop][1] = self.build(item, loop)
            start = loop
        else:
            for _ in range(high - low):  # optional copies: (item (item (...)?)?)?
                start = self.new("split", self.build(item, start), out)
        for _ in range(low):
            start = self.build(item, start)
        return start


class Pattern:
    """A regular expression (the subset in this module's docstring) matched in linear time."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise PatternError(f"a pattern must be a string, not {type(pattern).__name__}")
        if len(pattern) > MAX_LENGTH:
            raise PatternError(f"pattern {pattern[:40]!r}...: {len(pattern)} characters, more than {MAX_LENGTH}")
        self.pattern = pattern
        tree = _Parser(pattern).parse()
        self.literal = _literal(tree)
        nfa = _Nfa(pattern)
        match = nfa.new("match")
        self.start = nfa.build(tree, match)
        self.states = nfa.states

    def _closure(self, states: list[int], position: int, length: int) -> set[int]:
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            state = self.states[s]
            if state[0] == "split":
                stack.extend((state[1], state[2]))
            elif state[0] == "bol" and position == 0:
                stack.append(state[1])
            elif state[0] == "eol" and position == length:
                stack.append(state[1])
        return seen

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of `text` matches (as `re.fullmatch`)."""
        if self.literal is not None:
            return text == self.literal
        current = self._closure([self.start], 0, len(text))
        for position, ch in enumerate(text):
            step = [self.states[s][2] for s in current if self.states[s][0] == "char" and self.states[s][1](ch)]
            if not step:
                return False
            current = self._closure(step, position + 1, len(text))
        return any(self.states[s][0] == "match" for s in current)


def _literal(node: _Node) -> str | None:
    """The string a pattern of literal characters only matches, or None."""
    if node.kind == "char":
        return node.literal
    if node.kind == "seq":
        parts = [_literal(item) for item in node.items]
        return None if any(p is None for p in parts) else "".join(parts)
    return None


def peft_suffix_match(key: str, path: str) -> bool:
    """HF PEFT's `rank_pattern`/`alpha_pattern` rule (`re.match(rf"(.*\\.)?({key})$", path)`), in linear time."""
    pattern = Pattern(key)
    if pattern.literal is not None:
        return path == pattern.literal or path.endswith("." + pattern.literal)
    return Pattern(rf"(?:.*\.)?(?:{key})").fullmatch(path)
