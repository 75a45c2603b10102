"""The committed generated code matches the protos: regenerating it changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "loraserve").rglob("*") if p.is_file()}
    assert fresh, "the generator wrote nothing"
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in (ROOT / "loraserve" / "v1").iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    }
    stale = sorted(str(path) for path in fresh.keys() | committed.keys() if fresh.get(path) != committed.get(path))
    assert not stale, f"generated code differs from the protos; run scripts/generate_protos.py: {stale}"


def test_every_message_field_is_documented() -> None:
    """The contract is read by people: every message, field, enum value, service and RPC has a comment."""
    from loraserve.v1 import inference_pb2

    proto = (ROOT / "protos" / "loraserve" / "v1" / "inference.proto").read_text()
    lines = proto.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_declaration = stripped.startswith(("message ", "enum ", "service ", "rpc ")) or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "package", "option"))
        )
        if is_declaration:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
    assert inference_pb2.DESCRIPTOR.package == "loraserve.v1"
