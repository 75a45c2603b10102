"""LoRA adapters as requests and ModelInfo see them: the id rules, the start-up spec, what is reported of each."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from loraserve.errors import ConfigError

# Ids are names, never paths: no separators, no "..", so an id can never reach outside an adapter root.
ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def public_source(source: str) -> str:
    """A model or adapter source without the server's filesystem in it: s3:// locations and names as they are, a
    local path by its last component."""
    if source.startswith("s3://") or "/" not in source:
        return source
    return PurePath(source).name


def is_valid_adapter_id(adapter_id: str) -> bool:
    return bool(ADAPTER_ID_PATTERN.fullmatch(adapter_id)) and ".." not in adapter_id


def adapter_id_rule() -> str:
    return "1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to load: its id and where it is (a local folder, or s3://bucket/prefix)."""

    id: str
    path: str
    shown: str = ""  # how responses and error messages name the source: never a server path ("" = derived)

    @property
    def public_source(self) -> str:
        """The source as clients may see it: an S3 location as it is, a local folder by the name the request gave
        (relative to --adapter-root) or, for one given at start, by its own name."""
        return self.shown or public_source(self.path)

    @classmethod
    def parse(cls, spec: str) -> AdapterSpec:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ConfigError(f"--adapter takes NAME=PATH, got {spec!r}")
        if not is_valid_adapter_id(name):
            raise ConfigError(f"--adapter {spec!r}: the name must be {adapter_id_rule()}")
        return cls(id=name, path=path)


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter, as ModelInfo reports it."""

    id: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    source: str
    prompt_format: str = ""  # the format it was trained with (loraserve.json); "" = the server's
    active_requests: int = 0
    version: str = ""  # the S3 version it came from
    content_hash: str = ""  # sha256 of its config and weights: what the prefix cache keys its blocks by
