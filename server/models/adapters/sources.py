"""Where LoadAdapter may read an adapter from: a folder under --adapter-root, or an S3 prefix under one of
--adapter-buckets. Nothing else: a request can never name an arbitrary path or bucket."""

from __future__ import annotations

from pathlib import Path

from loraserve.errors import ConfigError, InvalidRequest, PermissionDenied
from loraserve.server.models.adapters.spec import AdapterSpec, adapter_id_rule, is_valid_adapter_id
from loraserve.storage import ArtifactNotFound, S3Location


def _allowed(location: S3Location, entries: tuple[str, ...]) -> bool:
    """Whether the location lies under an entry ("bucket", or "bucket/prefix" and below), segment by segment:
    "bucket/team" allows s3://bucket/team/x but never s3://bucket/teamX. An entry that is no usable location (one
    with a ".." segment, say) allows nothing."""
    for entry in entries:
        try:
            allowed = S3Location.parse(f"s3://{entry.strip('/')}")
        except ConfigError:
            continue
        depth = len(allowed.segments)
        if location.bucket == allowed.bucket and location.segments[:depth] == allowed.segments:
            return True
    return False


def resolve_source(adapter_id: str, source: str, root: str, buckets: tuple[str, ...]) -> AdapterSpec:
    if not is_valid_adapter_id(adapter_id):
        raise InvalidRequest(f"{adapter_id!r} is not a valid adapter id: use {adapter_id_rule()}", "adapter_id")
    if not source:
        raise InvalidRequest("must name a folder under the adapter root or an s3:// prefix", "source")
    if source.startswith("s3://"):
        try:
            location = S3Location.parse(source)
        except ConfigError as error:
            raise InvalidRequest(str(error), "source") from None
        if not _allowed(location, buckets):
            allowed = ", ".join(buckets) or "none (the server has no --adapter-buckets)"
            raise PermissionDenied(f"source: {source} is not in an allowed bucket or prefix ({allowed})")
        return AdapterSpec(adapter_id, source)
    if not root:
        raise PermissionDenied("source: this server loads no local adapters at runtime (it has no --adapter-root)")
    base = Path(root).expanduser().resolve()
    try:
        folder = (base / source).resolve()
        if not folder.is_relative_to(base):
            raise PermissionDenied(f"source: {source!r} is outside the adapter root")
        if not folder.is_dir():
            raise ArtifactNotFound(f"source: no adapter folder {source!r} under the adapter root")
    except (OSError, ValueError) as error:  # a name too long, a NUL byte: not a path this system can have
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidRequest(f"is not a usable folder name ({reason})", "source") from None
    return AdapterSpec(adapter_id, str(folder), shown=source)
