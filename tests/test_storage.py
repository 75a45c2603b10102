"""Adapters in S3, against moto's standalone S3 server over real HTTP on 127.0.0.1: versioned pushes, a `latest`
pointer, pulls that verify every checksum, and refusals that leave nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.storage import S3Location, StorageError, pull, push, s3_client, sha256_file

ROOT = Path(__file__).resolve().parent.parent


def adapter_folder(root: Path, content: bytes = b"weights") -> Path:
    """A complete adapter folder as `loraserve train` writes it: files plus a manifest of their sha256."""
    folder = root / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(content * 1000)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / "manifest.json").write_text(json.dumps({"run_id": f"run-{content.decode()}", "files": files}))
    return folder


def test_push_then_pull_roundtrips_every_file(bucket: str, tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "src")
    location = S3Location.parse(f"s3://{bucket}/team/pirate")
    version = push(folder, location)
    assert version == "run-weights"
    keys = {o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {
        f"team/pirate/run-weights/{name}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json")
    } | {"team/pirate/latest"}
    pulled = pull(location, tmp_path / "dst" / "pirate")
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert all((pulled / p.name).read_bytes() == p.read_bytes() for p in folder.iterdir())


def test_latest_moves_to_the_newest_complete_version(bucket: str, tmp_path: Path) -> None:
    location = S3Location.parse(f"s3://{bucket}/a")
    push(adapter_folder(tmp_path / "one", b"one"), location)
    push(adapter_folder(tmp_path / "two", b"two"), location)
    latest = pull(location, tmp_path / "latest")
    assert (latest / "adapter_model.safetensors").read_bytes() == b"two" * 1000
    pinned = pull(location, tmp_path / "pinned", version="run-one")
    assert (pinned / "adapter_model.safetensors").read_bytes() == b"one" * 1000


def test_a_corrupted_object_is_refused_and_nothing_is_left(bucket: str, tmp_path: Path) -> None:
    location = S3Location.parse(f"s3://{bucket}/c")
    version = push(adapter_folder(tmp_path / "src"), location)
    s3_client().put_object(Bucket=bucket, Key=location.key(version, "adapter_model.safetensors"), Body=b"tampered")
    destination = tmp_path / "dst" / "adapter"
    with pytest.raises(StorageError, match=r"adapter_model\.safetensors is corrupted"):
        pull(location, destination)
    assert not destination.exists() and list((tmp_path / "dst").iterdir()) == []


def test_incomplete_uploads_missing_versions_and_changed_folders_are_refused(bucket: str, tmp_path: Path) -> None:
    location = S3Location.parse(f"s3://{bucket}/d")
    s3_client().put_object(Bucket=bucket, Key=location.key("half", "adapter_model.safetensors"), Body=b"x")
    with pytest.raises(StorageError, match="not a complete upload"):
        pull(location, tmp_path / "x", version="half")
    with pytest.raises(StorageError, match="latest"):
        pull(S3Location.parse(f"s3://{bucket}/nothing-here"), tmp_path / "y")
    folder = adapter_folder(tmp_path / "src")
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(StorageError, match="does not match its sha256"):
        push(folder, location)
    with pytest.raises(StorageError, match=r"no manifest\.json"):
        push(tmp_path, location)


def test_an_unreachable_endpoint_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port) -> None:
    closed = free_port()  # no server of this run will listen there
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "LORASERVE_S3_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match="S3 unreachable"):
        pull(S3Location.parse("s3://bucket/x"), tmp_path / "z")


def test_locations_are_checked() -> None:
    assert S3Location.parse("s3://b/p/q/") == S3Location("b", "p/q")
    from loraserve.errors import ConfigError

    for bad in ("b/p", "s3://", "https://b/p"):
        with pytest.raises(ConfigError, match="not an S3 location"):
            S3Location.parse(bad)


def test_the_cli_pushes_and_pulls(bucket: str, tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "src")
    env = dict(os.environ)
    loraserve = [sys.executable, "-m", "loraserve.cli", "adapters"]
    pushed = subprocess.run(
        [*loraserve, "push", str(folder), f"s3://{bucket}/cli", "--version", "v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pushed.returncode == 0 and pushed.stdout.strip() == "v1", pushed.stderr
    pulled = subprocess.run(
        [*loraserve, "pull", f"s3://{bucket}/cli", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pulled.returncode == 0 and (tmp_path / "out" / "manifest.json").is_file(), pulled.stderr
    missing = subprocess.run(
        [*loraserve, "pull", f"s3://{bucket}/cli", str(tmp_path / "o2"), "--version", "v9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "not a complete upload" in missing.stderr
