"""The output constraints the property tests send, each with how to check a text generated under it."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema

from loraserve.v1 import inference_pb2 as pb


@dataclasses.dataclass(frozen=True)
class Constraint:
    """An OutputConstraint and how to check a text generated under it: `complete` says whether a text that ended
    CONSTRAINT_COMPLETE is in the language, `prefix` whether a cut-off text can still be completed (None: not
    checked). `refusable`: the contract lets the server refuse it (malformed, over a limit, an empty language, or
    something the library does not implement); any other constraint must never be refused."""

    fields: dict[str, Any]
    complete: Callable[[str], bool] | None = None
    prefix: Callable[[str], bool] | None = None
    refusable: bool = False

    def message(self) -> pb.OutputConstraint:
        fields = dict(self.fields)
        if "choice" in fields:
            fields["choice"] = pb.Choices(values=fields["choice"])
        return pb.OutputConstraint(**fields)


def regex(pattern: str, python: bool = True, refusable: bool = False) -> Constraint:
    """A regex constraint; `python`: simple enough for Python's re to check the output in no time."""
    checker = (lambda t: re.fullmatch(pattern, t, re.ASCII) is not None) if python else None
    return Constraint({"regex": pattern}, checker, refusable=refusable)


def schema(value: Any, validate: bool = True, refusable: bool = False) -> Constraint:
    """A json_schema constraint (value: a schema object, or raw text); `validate`: check outputs with jsonschema (not
    where Python's floats or regexes would judge otherwise than the schema's decimal numbers and Rust regexes)."""
    text = value if isinstance(value, str) else json.dumps(value)

    def complete(output: str) -> bool:
        document = json.loads(output)
        if validate:
            jsonschema.validate(document, json.loads(text))
        return True

    def prefix(output: str) -> bool:  # compact JSON, unless the schema asks for flexible whitespace
        output = output.lstrip() if "whitespace_flexible" in text else output
        return output == "" or output[0] in '{["-0123456789tfn'

    return Constraint({"json_schema": text}, complete, prefix, refusable)


def choice(values: list[str], refusable: bool = False) -> Constraint:
    return Constraint(
        {"choice": values}, lambda t: t in values, lambda t: any(v.startswith(t) for v in values), refusable
    )


def grammar(text: str, python_regex: str | None = None, refusable: bool = False) -> Constraint:
    checker = (lambda t: re.fullmatch(python_regex, t) is not None) if python_regex is not None else None
    return Constraint({"grammar": text}, checker, refusable=refusable)


def padded(text: str, size: int, pad: Callable[[str, int], str]) -> str:
    return pad(text, max(0, size - len(text.encode())))


def nested_arrays(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        value = {"type": "array", "items": value, "maxItems": 1}
    return value


PERSON = {
    "type": "object",
    "properties": {"name": {"enum": ["Ada", "Alan"]}, "age": {"type": "integer", "minimum": 20, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
LINKED_LIST = {
    "$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}]}},
    "$ref": "#/$defs/n",
}
# Well-formed constraints, some with an empty language (nothing satisfies them) or a pathological regex.
CONSTRAINTS = [
    Constraint({"json_object": True}, lambda t: isinstance(json.loads(t), dict), lambda t: t == "" or t[0] == "{"),
    schema(PERSON),
    schema({}),
    schema({"type": "string", "maxLength": 0}),
    schema({"const": None}),
    schema({"enum": []}, refusable=True),
    schema({"type": "integer", "minimum": 5, "maximum": 1}, refusable=True),
    schema({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}, refusable=True),
    schema({"type": "number", "minimum": 1.7976931348623157e308}, validate=False, refusable=True),
    schema({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 5e-324}, validate=False, refusable=True),
    schema({"type": "number", "multipleOf": 1e-40}, validate=False, refusable=True),
    schema({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}),
    schema({"type": "array", "minItems": 2**63}),
    schema({"type": "string", "minLength": 1000}),
    schema({"type": "string", "pattern": "(a+)+$"}, validate=False),
    schema({"type": "string", "pattern": "^[a-z]{2}$"}),
    schema({"type": "string", "format": "date-time"}, validate=False),
    schema({"allOf": [{"type": "string"}, {"type": "integer"}]}, refusable=True),
    schema({"type": "object", "properties": {"a": False}, "required": ["a"]}, refusable=True),
    schema({"properties": {"a": {"type": "integer"}}, "additionalProperties": False, "required": ["a", "b"]}),
    schema({"type": "object", "properties": {"": {"type": "string"}, "\x00": {"type": "null"}}, "required": [""]}),
    schema({"type": "object", "properties": {"日本": {"type": "boolean"}}, "required": ["日本"]}),
    schema({"$ref": "#"}, refusable=True),
    schema(LINKED_LIST),
    schema(nested_arrays(25)),
    schema({"type": "object", "x-guidance": {"whitespace_flexible": True}}),
    schema({"type": ["string", "null"], "maxLength": 3}),
    regex(r"[0-9]{3}"),
    regex(r"[A-Z][a-z]{2,6}, [0-9]{4}"),
    regex(r"(yes|no)"),
    regex(r"\d+\.\d+"),
    regex(r"x*"),
    regex(r"a|"),
    regex(r"\n+"),
    regex("\x00"),
    regex(r"(?i)hello"),
    regex(r"[\u4e00-\u9fff]{1,3}"),
    regex(r"[^\x00-\x7f]+"),
    regex(r"a{1000}"),
    # The text of a special token, which the tokenizer keeps as a control token: refused, with a clear message
    # (llguidance would offer the token, then refuse it once taken: guidance-ai/llguidance#366).
    regex(r"<\|im_end\|>", refusable=True),
    regex(r"a{0,100000}", python=False),
    regex(r"(a+)+$", python=False),
    regex(r"(a|aa)*b", python=False),
    regex(r"(x+x+)+y", python=False),
    regex(r"(.*a){12}", python=False),
    regex(r"\p{Greek}+", python=False),
    regex(r"^abc$", python=False),
    regex(r"\bword\b", python=False, refusable=True),
    regex(r"[^\s\S]", python=False, refusable=True),
    choice(["yes", "no"]),
    choice(["a", "ab", "abc"]),
    choice(["a", "a", "a"]),
    choice(["日本", "🙂", "e\u0301"]),
    choice([" ", "\n", "\t"]),
    choice(["\x00"]),
    choice(["<|im_end|>", "<|endoftext|>", "<|im_start|>"]),
    choice(["word " * 40]),
    grammar('start: "x = " NUMBER ";"\nNUMBER: /[1-9][0-9]{0,3}/', r"x = [1-9][0-9]{0,3};"),
    grammar('start: item ("," item)*\nitem: /[a-z]+/', r"[a-z]+(,[a-z]+)*"),
    grammar('start: "a" start | "a"', r"a+"),
    grammar("start: start", refusable=True),
    grammar('start: ""', r""),
    grammar('start: %json { "type": "integer" }', r"-?(0|[1-9][0-9]*)"),
    grammar("start: /[^\\s\\S]/", refusable=True),
    grammar("start: /(a+)+$/"),
]
# Constraints the contract calls malformed: INVALID_ARGUMENT.
MALFORMED_CONSTRAINTS = [
    Constraint({"json_object": False}, refusable=True),
    schema({"not": {}}, refusable=True),
    schema({"$ref": "#/$defs/missing"}, refusable=True),
    schema("true", refusable=True),
    schema("[]", refusable=True),
    schema("{", refusable=True),
    schema("", refusable=True),
    schema("  ", refusable=True),
    regex(r"(?=a)a", python=False, refusable=True),
    regex(r"(a)\1", python=False, refusable=True),
    regex(r"[a-z", python=False, refusable=True),
    regex("", refusable=True),
    regex(" ", refusable=True),
    choice([], refusable=True),
    choice([""], refusable=True),
    choice(["a", ""], refusable=True),
    grammar("start: undefined_rule", refusable=True),
    grammar("", refusable=True),
]


def limit_constraints(limits: pb.ServerLimits) -> list[Constraint]:
    """Constraints at and just past the published size limits (refusable past them only)."""
    size, count = limits.max_constraint_bytes, limits.max_constraint_choices
    out = []
    for n in (size, size + 1):
        over = n > size
        described = padded('{"type": "boolean", "description": ""}', n, lambda t, k: t[:-2] + "d" * k + t[-2:])
        out.append(schema(described, refusable=over))
        out.append(grammar(padded('start: "ok"\n//', n, lambda t, k: t + "c" * k), r"ok", refusable=over))
        out.append(regex("b" * n, refusable=over))
        out.append(choice(["d" * (size // 2), "e" * (n - size // 2)], refusable=over))
    for k in (count, count + 1):
        out.append(choice([f"c{i}" for i in range(k)], refusable=k > count))
    return out
