"""PEFT's alpha_pattern and rank_pattern: regular expressions from a client's adapter, matched against module names.
Bounded before they run, so that no key can make matching backtrack without end."""

from __future__ import annotations

import math
import re
from re import _constants as sre
from re import _parser as sre_parser
from typing import Any

from loraserve.errors import ConfigError

# alpha_pattern / rank_pattern keys are regexes, matched the way PEFT matches them (backtracking `re`) against each
# adapted module's name. Their length does not bound that work ("(.|.)" fourteen times, "(a+)+", ".*.*.*x" are all
# short), so each key is parsed with re's own parser and refused unless it can split a module name in at most
# MAX_PATTERN_WAYS ways: only single characters repeat, and repeats and alternatives multiply up to that bound. The
# names are few and short (model.layers.N.block.projection), so reading an adapter costs at most keys x modules
# bounded matches.
MAX_PATTERN_KEYS = 1024  # tools that write one literal key per module need 7 x the layers
MAX_PATTERN_LENGTH = 256
# One free repeat (65 ways over a 64-character name) fits, two do not: 1,024 keys over an 80-layer model stay under
# a second of matching.
MAX_PATTERN_WAYS = 1_000
MODULE_NAME_LENGTH = 64  # longer than any name matched: model.layers.NNN.self_attn.gate_proj is 37
_SINGLE_CHARACTER = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)


def pattern_value(patterns: list[tuple[re.Pattern[str], float]], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a module name's suffix."""
    for pattern, value in patterns:
        if pattern.match(module):
            return value
    return default


def read_patterns(config: dict, key: str, where: str) -> list[tuple[re.Pattern[str], float]]:
    """An adapter's alpha_pattern or rank_pattern, checked and compiled as PEFT matches them (peft get_pattern_key);
    a ConfigError naming the key for anything but regular expressions, bounded as above, mapped to numbers."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise ConfigError(f"{where}: {key} must be an object of regular expression -> number")
    if len(patterns) > MAX_PATTERN_KEYS:
        raise ConfigError(f"{where}: {key} has {len(patterns)} entries, more than {MAX_PATTERN_KEYS}")
    integer = key == "rank_pattern"
    compiled = []
    for pattern, value in patterns.items():
        number = finite(value)
        if number is None or (integer and not (isinstance(value, int) and value > 0)):
            wanted = "a positive integer" if integer else "a number"
            raise ConfigError(f"{where}: {key}: the value of {pattern[:80]!r} must be {wanted}, got {value!r:.80}")
        problem = _pattern_problem(pattern)
        if problem:
            raise ConfigError(f"{where}: {key}: {pattern[:80]!r} {problem}")
        compiled.append((re.compile(rf"(.*\.)?({pattern})$"), number))
    return compiled


def finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (true, "8", Infinity, an integer beyond floats)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _pattern_problem(pattern: str) -> str | None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        _ways(sre_parser.parse(pattern))
        re.compile(rf"(.*\.)?({pattern})$")  # what parses alone may not inside PEFT's wrapping: "(?i)q_proj"
    except (re.error, OverflowError) as error:  # OverflowError: a repeat count beyond re's limit
        return f"is not a regular expression ({error})"
    except ValueError as error:  # _ways' refusals
        return str(error)
    return None


def _ways(items: Any) -> int:
    """At most how many ways a parsed regex can split a module name: what backtracking may try. ValueError for what
    could make that unbounded: a repeated group or alternative, or more ways than MAX_PATTERN_WAYS."""
    ways = 1
    for op, arg in items:
        if op in _SINGLE_CHARACTER or op is sre.AT:
            continue
        if op is sre.SUBPATTERN:
            ways *= _ways(arg[-1])
        elif op is sre.BRANCH:
            ways *= sum(_ways(branch) for branch in arg[1])
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, body = arg
            if len(body) != 1 or body[0][0] not in _SINGLE_CHARACTER:
                raise ValueError("repeats a group or an alternative, which can backtrack without bound")
            ways *= max(1, min(high, MODULE_NAME_LENGTH) - low + 1)
        else:
            raise ValueError("uses lookarounds, backreferences, conditionals or atomic groups; PEFT keys need none")
        if ways > MAX_PATTERN_WAYS:
            raise ValueError(f"can match a module name in too many ways (over {MAX_PATTERN_WAYS}): fewer wildcards")
    return ways
