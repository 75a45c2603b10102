"""buf guards the contract: lint with the STANDARD rules, and no breaking change against the released snapshot
(protos/released/loraserve-v1.binpb). buf comes from npm (@bufbuild/buf, installed by `npm ci`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "protos" / "released" / "loraserve-v1.binpb"


@pytest.fixture(scope="module")
def buf() -> Path:
    binary = ROOT / "node_modules" / ".bin" / "buf"
    assert binary.exists(), "buf is missing: run `npm ci` (make test does)"
    return binary


def run_buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes(buf: Path) -> None:
    result = run_buf(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_contract(buf: Path) -> None:
    result = run_buf(buf, "breaking", "--against", str(SNAPSHOT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_renumbered_field_is_caught(buf: Path, tmp_path: Path) -> None:
    """The guard works: changing a released field's number fails `buf breaking`."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "loraserve" / "v1" / "inference.proto"
    text = proto.read_text()
    assert "optional float temperature = 1;" in text
    proto.write_text(text.replace("optional float temperature = 1;", "optional float temperature = 6;"))
    result = run_buf(buf, "breaking", "--against", str(SNAPSHOT), cwd=tmp_path)
    assert result.returncode != 0
    assert "temperature" in result.stdout + result.stderr
