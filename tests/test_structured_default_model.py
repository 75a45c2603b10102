"""Structured output on the real default model (SmolLM2-135M-Instruct): the 34 schemas of bench/data/json-schemas.json
(nested objects, arrays, enums, required and optional fields, bounded numbers, string patterns and formats) in one
concurrent batch, every completed output valid under its schema; regexes and choices likewise."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema

from loraserve.client import AsyncClient, StopReason

CORPUS = json.loads((Path(__file__).resolve().parent.parent / "bench" / "data" / "json-schemas.json").read_text())
FORMATS = jsonschema.FormatChecker()


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def generate_all(target: str, requests: list[dict]) -> list:
    async def main() -> list:
        async with AsyncClient(target, timeout=300) as client:
            return await asyncio.gather(*(client.generate(**r) for r in requests))

    return asyncio.run(main())


def test_the_corpus_examples_are_valid_under_their_schemas() -> None:
    """The corpus itself is right: each example document validates, so a schema cannot be unsatisfiable."""
    assert len(CORPUS) >= 30 and len({e["name"] for e in CORPUS}) == len(CORPUS)
    for entry in CORPUS:
        jsonschema.validate(entry["example"], entry["schema"], format_checker=FORMATS)


def test_every_completed_output_validates_under_its_schema(default_server) -> None:
    requests = [
        dict(messages=ask(e["prompt"] + " Answer in JSON."), json_schema=e["schema"], max_new_tokens=128)
        for e in CORPUS
    ]
    results = generate_all(default_server.target, requests)
    completed = 0
    for entry, result in zip(CORPUS, results, strict=True):
        if result.stop_reason is StopReason.CONSTRAINT_COMPLETE:
            completed += 1
            jsonschema.validate(json.loads(result.text), entry["schema"], format_checker=FORMATS)
        else:
            assert result.stop_reason is StopReason.MAX_TOKENS, (entry["name"], result.stop_reason)
    print(f"{completed} of {len(CORPUS)} completed")
    assert completed >= 0.75 * len(CORPUS)


def test_regex_and_choice_outputs_match(default_server) -> None:
    cases = [
        (dict(messages=ask("Give a US phone number."), regex=r"\(\d{3}\) \d{3}-\d{4}"), r"\(\d{3}\) \d{3}-\d{4}"),
        (dict(messages=ask("When was Python first released? Give the year."), regex=r"(19|20)\d{2}"), r"(19|20)\d{2}"),
        (dict(messages=ask("Write a product code."), regex=r"[A-Z]{3}-[0-9]{4}"), r"[A-Z]{3}-[0-9]{4}"),
    ]
    choices = [
        (ask("Is the sentiment of 'I hate waiting' positive or negative?"), ["positive", "negative"]),
        (ask("Which is a fruit?"), ["apple", "carrot", "potato"]),
        (ask("What color is the sky on a clear day?"), ["red", "green", "blue", "yellow"]),
    ]
    requests = [r for r, _ in cases] + [dict(messages=m, choice=c) for m, c in choices]
    results = generate_all(default_server.target, [r | {"max_new_tokens": 32} for r in requests])
    for (_, pattern), result in zip(cases, results, strict=False):
        assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE, result
        assert re.fullmatch(pattern, result.text, re.ASCII), result.text
    for (_, allowed), result in zip(choices, results[len(cases) :], strict=True):
        assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE and result.text in allowed, result.text
    # the model still chooses: the mask only keeps it to the list
    assert results[len(cases) + 2].text == "blue"
