"""Adapter artifacts in S3, shared by `loraserve adapter push/pull` and the server.

Layout under s3://bucket/prefix/:
  <version>/<file>         every file of the adapter folder
  <version>/manifest.json  written last: a version without it is an incomplete upload and is never used
  latest                   the newest complete version's name; one PUT, so readers see the old or the new one
Every file's sha256 is in the manifest; a download is checked against it before it is moved into place, so a
corrupted object is refused and nothing half-written is left behind. A download goes to a staging folder named
after its process (loraserve.files); one that a killed process left behind is removed by the next pull into the
same place.
Credentials come from the standard AWS chain (environment, shared config, instance or task role); AWS_ENDPOINT_URL
points at an S3-compatible endpoint. Timeouts and attempts are StorageConfig's (--s3-* flags, LORASERVE_S3_*).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.config import StorageConfig, from_env
from loraserve.errors import ConfigError, LoraserveError
from loraserve.files import remove_abandoned, staging_prefix, sync_folder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
PARALLEL_TRANSFERS = 8


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
        return StorageFull(f"{what}: no space left on the local disk ({error.filename or 'cache'}); free some")
    return StorageError(f"{what}: {error.strerror or error}")


def write_manifest(folder: Path, kind: str) -> None:
    """Give a folder (a model, say) the manifest of sha256 checksums that push and pull rely on."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")


def push(folder: Path, location: S3Location, version: str | None = None, client: Any = None) -> str:
    """Upload a complete folder (one with a manifest) as a new version; return the version."""
    client = client or s3_client()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{folder}: no {MANIFEST}; push the adapter folder a `loraserve train` run wrote")
    manifest = json.loads(manifest_path.read_text())
    files: dict[str, str] = manifest.get("files", {})
    for name, expected in files.items():
        if sha256_file(folder / name) != expected:
            raise StorageError(f"{folder / name}: does not match its sha256 in {MANIFEST}; the folder was changed")
    version = version or manifest.get("run_id") or sha256_bytes(json.dumps(files, sort_keys=True).encode())[:16]

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
    if version:
        return version
    response = _call(
        f"reading {location}/{LATEST} (no version given)",
        client.get_object,
        Bucket=location.bucket,
        Key=location.key(LATEST),
    )
    return response["Body"].read().decode().strip()


def fetch(location: S3Location, cache: Path, version: str | None = None, client: Any = None) -> tuple[Path, str]:
    """The local copy of a version (default: latest) under cache/s3/bucket/prefix/version, downloaded only when it is
    not there yet: a cached folder was verified before it was moved into place."""
    client = client or s3_client()
    version = resolve_version(location, version, client)
    target = cache.expanduser() / "s3" / location.bucket / location.prefix / version
    if (target / MANIFEST).is_file():
        logger.info("using cached artifact", extra={"location": str(location), "version": version})
        return target, version
    return pull(location, target, version, client), version


def pull(location: S3Location, destination: Path, version: str | None = None, client: Any = None) -> Path:
    """Download a version (default: latest), verify every file's sha256, then move it into `destination`."""
    client = client or s3_client()
    version = resolve_version(location, version, client)
    body = _call(
        f"{location}/{version} is not a complete upload (no {MANIFEST})",
        client.get_object,
        Bucket=location.bucket,
        Key=location.key(version, MANIFEST),
    )["Body"].read()
    manifest = json.loads(body)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(destination.parent, f"{destination.name}.partial")
        staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=staging_prefix(f"{destination.name}.partial")))
    except OSError as error:
        raise local_disk_error(f"preparing {destination}", error) from None
    try:

        def download(item: tuple[str, str]) -> None:
            name, expected = item
            target = staging / name
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
            list(pool.map(download, manifest["files"].items()))
        _call(f"writing {MANIFEST}", (staging / MANIFEST).write_bytes, body)
        replace_folder(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("pulled adapter", extra={"location": str(location), "version": version, "path": str(destination)})
    return destination


def replace_folder(staging: Path, destination: Path) -> None:
    """Move a complete folder into place. An existing one is renamed aside first, so that at every moment
    `destination` is either the old complete folder, absent, or the new complete one."""
    old = destination.with_name(f"{staging.name}-old")
    if destination.exists():
        destination.rename(old)
    staging.rename(destination)
    sync_folder(destination.parent)
    shutil.rmtree(old, ignore_errors=True)
