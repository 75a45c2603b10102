"""Adapter artifacts in S3, shared by `loraserve adapters push/pull` and the server.

Layout under s3://bucket/prefix/:
  <version>/<file>         every file of the adapter folder
  <version>/manifest.json  written last: a version without it is an incomplete upload and is never used
  latest                   the newest complete version's name; one PUT, so readers see the old or the new one
Every file's sha256 is in the manifest; a download is checked against it before it is moved into place, so a
corrupted object is refused and nothing half-written is left behind. A download goes to a staging folder named
after its process (loraserve.files); one that a killed process left behind is removed by the next pull into the
same place.
Whoever can write to a bucket can write its `latest` and manifests: the names in them become local paths only when each
is one plain segment (versions, prefix segments, file names), and every path built from them must lie inside its
folder (the cache, the staging folder), symlinks resolved, before anything is created, renamed or removed.
Credentials come from the standard AWS chain (environment, shared config, instance or task role); AWS_ENDPOINT_URL
points at an S3-compatible endpoint. Timeouts and attempts are StorageConfig's (--s3-* flags, LORASERVE_S3_*).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.config import StorageConfig, from_env
from loraserve.errors import ConfigError, LoraserveError
from loraserve.files import exclusive, remove_abandoned, staging_prefix, sync_folder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
PARALLEL_TRANSFERS = 8
MAX_LATEST_BYTES = 256
MAX_MANIFEST_BYTES = 1 << 20  # ~100 bytes a file: room for thousands of shards

# A version is one folder of the cache: one segment, never `..` or a dot-name (the cache's own staging, lock and
# pulled-mark entries are dot-names). What push makes fits: run ids (12 hex, '-', 8 hex) and 16-hex digests.
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"
# S3's rules for bucket names, but for their 3-character minimum: S3 refuses a shorter name itself, and it is one
# safe folder all the same.
BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
BUCKET_RULE = "at most 63 characters from a-z 0-9 . -, a letter or digit at each end, without '..'"
NAME_RULE = "a plain name: not empty, no / \\ or control characters, not starting with '.', at most 255 bytes"
SHA256 = re.compile(r"[0-9a-f]{64}")


class StorageError(LoraserveError):
    """An artifact cannot be stored or fetched."""


class ArtifactNotFound(StorageError):
    """No such bucket, version, or complete upload."""


class ArtifactCorrupted(StorageError):
    """A file does not match the sha256 in its manifest."""


class StorageUnavailable(StorageError):
    """S3 could not be reached, even after retries with backoff."""


class StorageFull(StorageError):
    """The local disk has no room for the download."""


def is_valid_version(version: str) -> bool:
    return bool(VERSION.fullmatch(version)) and ".." not in version


def checked_version(version: str) -> str:
    if not is_valid_version(version):
        raise ConfigError(f"version {version[:200]!r} is not a version name: use {VERSION_RULE}")
    return version


def is_plain_name(name: str) -> bool:
    """Whether `name` can be one entry of a local folder and nothing else (prefix segments, manifest file names)."""
    return (
        bool(name)
        and not name.startswith(".")
        and all(c.isprintable() and c not in "/\\" for c in name)
        and len(name.encode()) <= 255  # a file name's limit on Linux file systems
    )


_settings: StorageConfig | None = None


def use_settings(config: StorageConfig) -> None:
    """Set the process's S3 timeouts and attempts from the command line (as logging is configured once); without
    it they come from LORASERVE_S3_* variables and the defaults."""
    global _settings
    _settings = config


def settings() -> StorageConfig:
    return _settings or from_env(StorageConfig)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    def __post_init__(self) -> None:
        """The bucket and each prefix segment become folders of the cache: only S3 bucket names and plain segments."""
        uri = f"s3://{self.bucket}/{self.prefix}"
        where = f"{uri[:300]!r} is not a usable S3 location"
        if not BUCKET.fullmatch(self.bucket) or ".." in self.bucket:
            raise ConfigError(f"{where}: the bucket must be {BUCKET_RULE}")
        for segment in self.segments:
            if not is_plain_name(segment):
                raise ConfigError(f"{where}: the prefix segment {segment[:80]!r} is not {NAME_RULE}")

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.prefix.split("/")) if self.prefix else ()

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise ConfigError(f"{uri!r} is not an S3 location; write s3://bucket/prefix")
        bucket, _, prefix = uri[5:].partition("/")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    chosen = settings()
    config = Config(
        retries={"total_max_attempts": chosen.s3_max_attempts, "mode": "standard"},
        connect_timeout=chosen.s3_connect_timeout,
        read_timeout=chosen.s3_read_timeout,
    )
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


def transfer_config() -> Any:
    """s3transfer retries a download that breaks mid-object on its own count: bound it by the same setting."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(num_download_attempts=settings().s3_max_attempts)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _call(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an S3 call; turn its errors (S3 refusals, retries run out, a full local disk) into StorageError naming
    what was being done."""
    from boto3.exceptions import RetriesExceededError  # what download_file raises when its retries run out
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(*args, **kwargs)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        missing = code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
        raise (ArtifactNotFound if missing else StorageError)(f"{what}: {code or error}") from None
    except (BotoCoreError, RetriesExceededError) as error:
        attempts = settings().s3_max_attempts
        raise StorageUnavailable(f"{what}: S3 unreachable after {attempts} attempts ({error})") from None
    except OSError as error:
        raise local_disk_error(what, error) from None


def local_disk_error(what: str, error: OSError) -> StorageError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: no space left on the local disk of the model cache; free some")
    return StorageError(f"{what}: {error.strerror or error}")


def read_manifest(body: bytes, what: str) -> dict[str, Any]:
    """A manifest, checked before any of its names becomes a path: a JSON object whose `files` maps plain file names
    (not the manifest itself) to sha256 hex digests. Anything else is ArtifactCorrupted, naming `what`."""
    try:
        manifest = json.loads(body) if len(body) <= MAX_MANIFEST_BYTES else None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested beyond the parser
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactCorrupted(f"{what} is not a manifest: a JSON object with `files` (name -> sha256), <= 1 MiB")
    for name, digest in files.items():
        if not is_plain_name(name) or name == MANIFEST:
            raise ArtifactCorrupted(f"{what} lists the file {name[:80]!r}, which is not {NAME_RULE} (nor {MANIFEST})")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ArtifactCorrupted(f"{what}: the sha256 of {name!r} is not 64 lowercase hex digits")
    return manifest


def inside(root: Path, *names: str) -> Path:
    """root/names, resolved, if it lies strictly inside root (resolved too). The names are plain already; this catches
    what a name check cannot see: a symlink on the way that leads elsewhere."""
    root = root.resolve()
    path = root.joinpath(*names).resolve()
    if path == root or not path.is_relative_to(root):
        # The message names no server path: it may reach the client whose request got here. The log has both.
        logger.error(
            "a path out of the cache was refused", extra={"names": names, "path": str(path), "root": str(root)}
        )
        raise StorageError(f"{'/'.join(names)} leads out of the cache (a link on the way); refused")
    return path


def write_manifest(folder: Path, kind: str) -> None:
    """Give a folder (a model, say) the manifest of sha256 checksums that push and pull rely on. Dot-files (a Hub
    snapshot's .gitattributes) are left out: they are no part of a model, and a pull takes only plain names."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_plain_name(p.name) and p.name != MANIFEST)
    files = {name: sha256_file(folder / name) for name in names}
    (folder / MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")


def push(folder: Path, location: S3Location, version: str | None = None, client: Any = None) -> str:
    """Upload a complete folder (one with a manifest) as a new version; return the version."""
    client = client or s3_client()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{folder}: no {MANIFEST}; push the adapter folder a `loraserve train` run wrote")
    manifest = read_manifest(manifest_path.read_bytes(), str(manifest_path))
    files: dict[str, str] = manifest["files"]
    for name, expected in files.items():
        if sha256_file(folder / name) != expected:
            raise StorageError(f"{folder / name}: does not match its sha256 in {MANIFEST}; the folder was changed")
    version = version or manifest.get("run_id") or sha256_bytes(json.dumps(files, sort_keys=True).encode())[:16]
    version = checked_version(str(version))

    def upload(name: str) -> None:
        _call(
            f"uploading {name} to {location}",
            client.upload_file,
            str(folder / name),
            location.bucket,
            location.key(version, name),
            ExtraArgs={"Metadata": {"sha256": files[name]}},
        )

    with ThreadPoolExecutor(PARALLEL_TRANSFERS) as pool:
        list(pool.map(upload, files))
    _call(
        f"uploading {MANIFEST}",
        client.upload_file,
        str(manifest_path),
        location.bucket,
        location.key(version, MANIFEST),
    )
    _call("updating latest", client.put_object, Bucket=location.bucket, Key=location.key(LATEST), Body=version.encode())
    logger.info("pushed adapter", extra={"location": str(location), "version": version, "files": len(files)})
    return version


def resolve_version(location: S3Location, version: str | None, client: Any) -> str:
    """The version given (ConfigError unless it is a version name), or the one `latest` names: S3 data, so a
    `latest` that names no version is ArtifactCorrupted."""
    if version:
        return checked_version(version)
    response = _call(
        f"reading {location}/{LATEST} (no version given)",
        client.get_object,
        Bucket=location.bucket,
        Key=location.key(LATEST),
    )
    named = response["Body"].read(MAX_LATEST_BYTES + 1).decode(errors="replace").strip()
    if not is_valid_version(named):
        raise ArtifactCorrupted(f"{location}/{LATEST} is corrupted: it names {named[:80]!r}, not a version")
    return named


def fetch(location: S3Location, cache: Path, version: str | None = None, client: Any = None) -> tuple[Path, str]:
    """The local copy of a version (default: latest) under cache/s3/bucket/prefix/version, downloaded unless a pull
    made it. Concurrent fetches of one version (LoadAdapter calls, replicas sharing the cache) take turns on its lock
    file, and the later ones find it in place."""
    client = client or s3_client()
    version = resolve_version(location, version, client)
    root = (cache.expanduser() / "s3").resolve()
    target = inside(root, location.bucket, *location.segments, version)
    if pulled(target):
        logger.info("using cached artifact", extra={"location": str(location), "version": version})
        return target, version
    try:
        with exclusive(lock_file(root, target)):
            if not pulled(target):  # the fetch that held the lock before this one may have pulled it
                pulled_mark(target).unlink(missing_ok=True)
                pull(location, target, version, client)
                pulled_mark(target).write_text(sha256_file(target / MANIFEST))
    except OSError as error:
        raise local_disk_error(f"caching {location}/{version}", error) from None
    return target, version


def lock_file(root: Path, folder: Path) -> Path:
    """The lock file of one cached version: kept apart in root/.locks (a bucket never starts with "."), so that a
    failed pull leaves the version's own folder as it found it, and named by a digest of the path, so that every
    name is short."""
    return root / ".locks" / f"{sha256_bytes(str(folder.relative_to(root)).encode())[:32]}.lock"


def pulled_mark(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.pulled")


def pulled(folder: Path) -> bool:
    """Whether fetch's pull made `folder`: its mark, written after the verified folder was moved into place, holds
    the sha256 of that folder's manifest. A folder that merely has a manifest.json (planted there, or left by an older
    loraserve) is pulled again. Re-hashing every file on each use would only compare the files with the manifest
    beside them, which says nothing about who wrote the folder, and would re-read a model of several GB at each start;
    whoever can write the cache can forge either, so the cache is trusted like the server's own files."""
    try:
        return pulled_mark(folder).read_text() == sha256_file(folder / MANIFEST)
    except OSError:
        return False


def pull(location: S3Location, destination: Path, version: str | None = None, client: Any = None) -> Path:
    """Download a version (default: latest), verify every file's sha256, then move it into `destination`."""
    client = client or s3_client()
    version = resolve_version(location, version, client)
    body = _call(
        f"{location}/{version} is not a complete upload (no {MANIFEST})",
        client.get_object,
        Bucket=location.bucket,
        Key=location.key(version, MANIFEST),
    )["Body"].read(MAX_MANIFEST_BYTES + 1)
    files: dict[str, str] = read_manifest(body, f"{location}/{version}/{MANIFEST}")["files"]
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(destination.parent, f"{destination.name}.partial")
        staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=staging_prefix(f"{destination.name}.partial")))
    except OSError as error:
        raise local_disk_error(f"preparing the download of {location}/{version}", error) from None
    try:

        def download(item: tuple[str, str]) -> None:
            name, expected = item
            target = inside(staging, name)
            _call(
                f"downloading {location}/{version}/{name}",
                client.download_file,
                location.bucket,
                location.key(version, name),
                str(target),
                Config=transfer_config(),
            )
            actual = sha256_file(target)
            if actual != expected:
                raise ArtifactCorrupted(
                    f"{location}/{version}/{name} is corrupted: sha256 {actual}, the manifest "
                    f"says {expected}; nothing was written"
                )

        with ThreadPoolExecutor(PARALLEL_TRANSFERS) as pool:
            list(pool.map(download, files.items()))
        _call(f"writing {MANIFEST}", (staging / MANIFEST).write_bytes, body)
        replace_folder(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("pulled adapter", extra={"location": str(location), "version": version, "path": str(destination)})
    return destination


def replace_folder(staging: Path, destination: Path) -> None:
    """Move a complete folder into place. An existing one is renamed aside first, so that at every moment
    `destination` is either the old complete folder, absent, or the new complete one. Only an entry of the staging
    folder's parent (symlinks resolved) is replaced: nothing elsewhere is ever renamed or removed."""
    parent = staging.parent.resolve()
    if destination.resolve().parent != parent:
        logger.error("a folder out of its download's folder was refused", extra={"destination": str(destination)})
        raise StorageError(f"{destination.name} is outside the folder of its download; nothing was replaced")
    old = destination.with_name(f"{staging.name}-old")
    if destination.exists():
        destination.rename(old)
    staging.rename(destination)
    sync_folder(destination.parent)
    shutil.rmtree(old, ignore_errors=True)
