"""The README stays true: its two first commands are the Makefile's, CI runs the same test command, and every
server option is documented."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from loraserve.cli import SERVE_CONFIGS
from loraserve.config import flag_name
from loraserve.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_first_screen_has_the_two_commands() -> None:
    first_screen = README.split("---", 1)[0]
    commands = re.findall(r"^make (\w+)", first_screen, flags=re.MULTILINE)
    assert commands == ["serve", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: ", makefile, re.MULTILINE) and re.search(r"^test: ", makefile, re.MULTILINE)


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert script.strip().splitlines()[-1] == "make test"


def test_every_option_is_in_the_readme() -> None:
    for config_cls in SERVE_CONFIGS:
        for f in fields(config_cls):
            assert f"`{flag_name(f)}`" in README, f"{flag_name(f)} is not documented"
    for f in fields(TrainConfig):  # the train table lists YAML keys; the flags are the keys with dashes
        assert f"`{f.name}`" in README or f"`{flag_name(f)}`" in README, f"train key {f.name} is not documented"
