"""The README and the guides in docs/ stay true: the README's two first commands are the Makefile's and CI runs the
same test command; every option is documented in docs/configuration.md; and on every page the examples run against
today's code (make targets, CLI command lines, grpcurl and curl bodies, Python), the repository paths named exist,
and every relative link reaches a file (and a heading, when it names one)."""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import fields
from itertools import pairwise
from pathlib import Path

import pytest
from google.protobuf import json_format

from loraserve.cli import SERVE_CONFIGS, build_parser
from loraserve.client import Client
from loraserve.config import ClientConfig, flag_name
from loraserve.trainer.config import TrainConfig
from loraserve.v1 import inference_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, *sorted((ROOT / "bench" / "results").glob("*.md"))]  # pages whose links are checked
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
# the folders a path in a page may start with; other code spans (`loraserve.json`, `s3://...`) are not paths here
TOP_FOLDERS = ("protos", "loraserve", "server", "client", "trainer", "tests", "bench", "deploy", "docs", "examples")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(page: Path, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang in languages]


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", page.read_text())


def shell_words(block: str) -> list[str]:
    """A shell block as words (quotes spanning lines, continuations and comments handled as the shell does)."""
    return shlex.split(block.replace("\\\n", " "), comments=True)


def shell_lines(block: str) -> list[list[str]]:
    """A shell block's commands, each as its words (a quote may span lines); `[optional]` brackets are dropped."""
    commands, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending += line.replace("[", "").replace("]", "") + "\n"
        try:
            commands.append(shlex.split(pending, comments=True))
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
    assert pending == "", f"an unclosed quote in {block!r}"
    return commands


def test_the_first_screen_has_the_two_commands() -> None:
    first_screen = README.split("---", 1)[0]
    commands = re.findall(r"^make (\w+)", first_screen, flags=re.MULTILINE)
    assert commands == ["serve", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: ", makefile, re.MULTILINE) and re.search(r"^test: ", makefile, re.MULTILINE)


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert script.strip().splitlines()[-1] == "make test"


def test_every_option_is_in_the_configuration_guide() -> None:
    for config_cls in (*SERVE_CONFIGS, ClientConfig):
        for f in fields(config_cls):
            assert f"`{flag_name(f)}`" in CONFIGURATION, f"{flag_name(f)} is not in docs/configuration.md"
    for f in fields(TrainConfig):  # the train table lists YAML keys; the flags are the keys with dashes
        documented = f"`{f.name}`" in CONFIGURATION or f"`{flag_name(f)}`" in CONFIGURATION
        assert documented, f"train key {f.name} is not in docs/configuration.md"


def test_the_configuration_tables_name_only_real_options() -> None:
    known = {flag_name(f) for cls in (*SERVE_CONFIGS, ClientConfig, TrainConfig) for f in fields(cls)}
    known |= {f.name for f in fields(TrainConfig)}
    lines = CONFIGURATION.splitlines()
    rows = [line for line, below in zip(lines, [*lines[1:], ""], strict=True) if not below.startswith("| ---")]
    first_cells = [row.split("|")[1] for row in rows if row.startswith("| ") and not row.startswith("| ---")]
    named = {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}
    assert named - known == set()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_make_targets_exist(page: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    used = re.findall(r"`make ([\w-]+)", page.read_text())
    for block in code_blocks(page, "sh"):
        used += [words[1] for words in shell_lines(block) if len(words) > 1 and words[0] == "make"]
    assert set(used) - targets == set()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_examples_parse(page: Path) -> None:
    parser = build_parser()
    for block in code_blocks(page, "sh"):
        for words in shell_lines(block):
            if words and Path(words[0]).name == "loraserve":
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{page_id(page)}: the CLI refuses {shlex.join(words)}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_grpcurl_and_curl_bodies_fit_the_contract(page: Path) -> None:
    for block in code_blocks(page, "sh"):
        words = shell_words(block)
        starts = [i for i, word in enumerate(words) if word in ("grpcurl", "curl")] + [len(words)]
        for start, end in pairwise(starts):
            command = words[start:end]
            body = command[command.index("-d") + 1] if "-d" in command else None
            if command[0] == "curl":
                if body is not None:
                    json.loads(body)
                continue
            methods = [word for word in command if re.fullmatch(r"loraserve\.v1\.\w+/\w+", word)]
            for method in methods:
                service, name = method.removeprefix("loraserve.v1.").split("/")
                descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]
                if body is not None:
                    json_format.Parse(body, getattr(pb, descriptor.input_type.name)())


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_json_and_python_examples_parse(page: Path) -> None:
    for block in code_blocks(page, "json"):
        json.loads(block)
    for block in code_blocks(page, "python"):
        tree = ast.parse(block)
        if "openai" in block:  # its `client` is the OpenAI SDK's
            continue
        called = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "client"
        }
        assert {name for name in called if not hasattr(Client, name)} == set()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_repository_paths_exist(page: Path) -> None:
    spans = re.findall(r"`([^`\n]+)`", prose(page))
    paths = [s for s in spans if re.fullmatch(r"[\w.*-]+(/[\w.*-]*)+", s) and s.split("/")[0] in TOP_FOLDERS]
    missing = [path for path in paths if not any(ROOT.glob(path.rstrip("/")))]
    assert missing == [], f"{page_id(page)} names paths that do not exist"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.MULTILINE):
        base, n = slug(heading), 0
        while (candidate := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


@pytest.mark.parametrize("page", LINKED, ids=page_id)
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page_id(page)} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page_id(page)} links to {target}: no such heading"
