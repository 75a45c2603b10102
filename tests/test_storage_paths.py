"""What S3 data may do to the local disk: versions, `latest`, prefixes and manifest names become paths only when they
are single safe segments; every path stays inside the cache; a cached folder is used only if a pull made it; and
concurrent fetches of one version take turns. Against moto's S3 server, as tests/test_storage.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from loraserve import storage
from loraserve.errors import ConfigError
from loraserve.storage import (
    ArtifactCorrupted,
    S3Location,
    StorageError,
    fetch,
    pull,
    push,
    replace_folder,
    s3_client,
)
from tests.conftest import HANG_GUARD_S
from tests.test_storage import adapter_folder


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def planted_folder(path: Path) -> Path:
    """A folder with a manifest.json that no pull made (another model, a user's checkout, a training run)."""
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"planted")
    (path / "manifest.json").write_text(json.dumps({"files": {}}))
    return path


def used_cache(tmp_path: Path, bucket: str) -> Path:
    """The cache of a server that has pulled from s3://bucket/team/pirate before (so `..` has folders to climb)."""
    cache = tmp_path / "cache"
    (cache / "s3" / bucket / "team" / "pirate").mkdir(parents=True)
    return cache


@pytest.mark.parametrize("version", ["../../../../../elsewhere", "..", "a/b", ".hidden", "a\\b", "a\x00b", "v" * 129])
def test_a_version_must_be_one_safe_segment(version: str, tmp_path: Path) -> None:
    planted_folder(tmp_path / "elsewhere")
    cache = used_cache(tmp_path, "bucket")
    before = tree(cache)
    with pytest.raises(ConfigError, match="version"):  # refused before S3 is asked: no client is needed
        fetch(S3Location("bucket", "team/pirate"), cache, version, client=object())
    assert tree(cache) == before


@pytest.mark.parametrize("latest", [b"../../../../../elsewhere", b"a/b", b"..", b"\xff\xfe", b"v" * 5000])
def test_a_hostile_latest_object_is_refused(latest: bytes, bucket: str, tmp_path: Path) -> None:
    planted_folder(tmp_path / "elsewhere")
    location = S3Location(bucket, "team/pirate")
    s3_client().put_object(Bucket=bucket, Key=location.key("latest"), Body=latest)
    cache = used_cache(tmp_path, bucket)
    before = tree(cache)
    with pytest.raises(ArtifactCorrupted, match=r"team/pirate/latest"):
        fetch(location, cache)
    assert tree(cache) == before


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/allowed/../other",
        "s3://bucket/./x",
        "s3://bucket/a//b",
        "s3://bucket/a\\b",
        "s3://bucket/a\x00b",
        "s3://bucket/.cache",
        "s3://bucket/" + "p" * 256,
        "s3://Bucket_Upper/x",
        "s3://bucket..dots/x",
        "s3://-bucket/x",
        "s3://../x",
    ],
)
def test_buckets_and_prefix_segments_are_checked(uri: str) -> None:
    with pytest.raises(ConfigError, match="S3 location"):
        S3Location.parse(uri)


def test_safe_locations_keep_their_segments() -> None:
    location = S3Location.parse("s3://my.bucket-1/team/pirate v2/")
    assert location.segments == ("team", "pirate v2") and S3Location.parse("s3://b").segments == ()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plant_manifest(bucket: str, location: S3Location, manifest: Any, objects: dict[str, bytes]) -> None:
    """A version whose manifest (and objects) someone with write access to the bucket crafted."""
    client = s3_client()
    for name, data in objects.items():
        client.put_object(Bucket=bucket, Key=location.key("v1", name), Body=data)
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    client.put_object(Bucket=bucket, Key=location.key("v1", "manifest.json"), Body=body)


@pytest.mark.parametrize(
    "name",
    [
        "../../escaped",
        "{work}/escaped-absolute",
        "sub/escaped",
        "..",
        ".",
        ".escaped",
        "manifest.json",
        "a\\b",
        "x" * 256,
    ],
)
def test_manifest_names_must_be_plain_file_names(name: str, bucket: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    name = name.format(work=work)
    location = S3Location(bucket, "crafted")
    objects = {name: b"payload", "ok.json": b"{}"}
    plant_manifest(bucket, location, {"files": {key: sha(data) for key, data in objects.items()}}, objects)
    with pytest.raises(ArtifactCorrupted, match=r"manifest\.json"):
        pull(location, work / "cache" / "deep" / "adapter", version="v1")
    assert tree(work) == []


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        [1, 2],
        {"kind": "adapter"},
        {"files": ["a.json"]},
        {"files": {"a.json": "not-a-sha256"}},
        {"files": {"a.json": 5}},
        {"files": {"a.json": "A" * 64}},
    ],
)
def test_a_manifest_that_is_not_an_object_of_sha256s_is_refused(manifest: Any, bucket: str, tmp_path: Path) -> None:
    location = S3Location(bucket, "crafted")
    plant_manifest(bucket, location, manifest, {"a.json": b"{}"})
    with pytest.raises(ArtifactCorrupted, match=r"crafted/v1/manifest\.json"):
        pull(location, tmp_path / "work" / "adapter", version="v1")
    assert tree(tmp_path / "work") == []


def test_a_cached_folder_is_used_only_if_a_pull_made_it(bucket: str, tmp_path: Path) -> None:
    location = S3Location(bucket, "team/pirate")
    push(adapter_folder(tmp_path / "src", b"real"), location, "v1")
    cache = tmp_path / "cache"
    planted_folder(cache / "s3" / bucket / "team" / "pirate" / "v1")
    folder, version = fetch(location, cache, "v1")
    assert version == "v1" and (folder / "adapter_model.safetensors").read_bytes() == b"real" * 1000
    # Once pulled, it is reused without asking S3 for the files again.
    for item in s3_client().list_objects_v2(Bucket=bucket, Prefix="team/pirate/v1/")["Contents"]:
        s3_client().delete_object(Bucket=bucket, Key=item["Key"])
    assert fetch(location, cache, "v1") == (folder, "v1")


def test_a_symlink_out_of_the_cache_is_not_followed(bucket: str, tmp_path: Path) -> None:
    location = S3Location(bucket, "team/pirate")
    push(adapter_folder(tmp_path / "src"), location, "v1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache" / "s3").mkdir(parents=True)
    (tmp_path / "cache" / "s3" / bucket).symlink_to(outside)
    with pytest.raises(StorageError, match="leads out of the cache") as refused:
        fetch(location, tmp_path / "cache", "v1")
    assert tree(outside) == [] and str(tmp_path) not in str(refused.value)  # no server path in the message


def test_replace_folder_never_reaches_outside_the_staging_parent(tmp_path: Path) -> None:
    staging = tmp_path / "cache" / ".v1.partial-1-x"
    staging.mkdir(parents=True)
    victim = tmp_path / "home" / "user"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="outside"):
        replace_folder(staging, victim)
    assert (victim / "notes.txt").read_text() == "mine" and staging.is_dir()


def lock_is_held(lock: Path) -> bool:
    """Whether someone holds the flock on `lock` (another open file description conflicts, even in this thread)."""
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class GatedClient:
    """An S3 client that holds every reader of `latest` until all of them have read it, so that they all look for
    the cached folder at once (the moment two LoadAdapter calls or two replicas race)."""

    def __init__(self, client: Any, parties: int) -> None:
        self.client = client
        self.gate = threading.Barrier(parties)

    def get_object(self, **kwargs: Any) -> Any:
        response = self.client.get_object(**kwargs)
        if kwargs["Key"].endswith("/latest"):
            self.gate.wait(timeout=HANG_GUARD_S)  # a hang guard only: every party reaches it
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_concurrent_fetches_of_one_version_take_turns(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = S3Location(bucket, "team/pirate")
    source = adapter_folder(tmp_path / "src")
    push(source, location, "v1")
    cache = tmp_path / "cache"
    pulls: list[bool] = []  # per pull: whether it ran holding a fetch lock (the cache's only one here)
    real_pull = storage.pull

    def watched_pull(location: S3Location, destination: Path, *args: Any, **kwargs: Any) -> Path:
        pulls.append(any(lock_is_held(lock) for lock in cache.rglob("*.lock")))
        return real_pull(location, destination, *args, **kwargs)

    monkeypatch.setattr(storage, "pull", watched_pull)
    client = GatedClient(s3_client(), parties=4)
    results: list[tuple[Path, str]] = []
    errors: list[BaseException] = []

    def fetch_one() -> None:
        try:
            results.append(fetch(location, cache, None, client))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads), f"hang guard: fetches still run after {HANG_GUARD_S:.0f} s"
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    assert pulls == [True], "one pull, under the lock; the later fetches find the folder in place"
    folder = results[0][0]
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in source.iterdir())
