"""The arrows run one way: gRPC side (server/) -> engine (server/engine/) -> model runners (server/models/), with
retrieval (server/retrieval/) beside the engine. The client and the CLI's client commands work without torch, the
servicer never loads torch itself, the engine never imports grpc, and the trainer reaches into the server only for
model loading."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRPC_SIDE = tuple(
    f"loraserve.server.{p.stem}" for p in (ROOT / "server").glob("*.py") if p.stem != "__init__"
)  # app, servicer, convert, status, rpc, interceptors
GRPC = ("grpc", "grpc_health", "grpc_reflection", "loraserve.v1")
HTTP_SIDE = ("loraserve.server.http_api", "fastapi", "starlette", "uvicorn")

# room -> module prefixes its modules must never import
FORBIDDEN = {
    "server/models": (*GRPC, *GRPC_SIDE, *HTTP_SIDE, "loraserve.server.engine", "loraserve.server.retrieval"),
    "server/models/adapters": (*GRPC, *GRPC_SIDE, *HTTP_SIDE, "loraserve.server.engine", "loraserve.server.retrieval"),
    "server/engine": (*GRPC, *GRPC_SIDE, *HTTP_SIDE, "loraserve.server.retrieval"),
    "server/retrieval": (*GRPC, *GRPC_SIDE, *HTTP_SIDE),
    # the families are plain data, checked on a config.json before torch is imported
    "server/models/families": (*GRPC, *GRPC_SIDE, *HTTP_SIDE, "torch", "transformers", "loraserve.server.engine"),
    # the HTTP API is a protocol beside gRPC: it talks to the engine and shares the status table and access checks,
    # but never reaches into the model runners or the gRPC servicers
    "server/http_api": ("loraserve.server.models", "loraserve.server.servicer", "loraserve.server.convert", "torch"),
    "trainer": (
        *GRPC,
        *GRPC_SIDE,
        *HTTP_SIDE,
        "loraserve.server.engine",
        "loraserve.server.retrieval",
        "loraserve.client",
    ),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (TYPE_CHECKING imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_no_room_imports_against_the_arrows(room: str) -> None:
    files = sorted((ROOT / room).glob("*.py"))
    assert files, room
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if breaks(name, FORBIDDEN[room])
    }
    assert not wrong, sorted(wrong)


# What the engine may take from the model side: the executor, and plain data about models and adapters.
ENGINE_FROM_MODELS = {
    "loraserve.server.models.executor": {"ModelExecutor"},
    "loraserve.server.models.types": {"RowWork"},
    "loraserve.server.models.adapters.spec": {"AdapterSpec", "AdapterInfo", "adapter_id_rule", "is_valid_adapter_id"},
    "loraserve.server.models.loading": {"LoadedModel"},
    "loraserve.server.models.adapters.files": {"LoraAdapter"},
}
# The executor's state, which only the executor touches
EXECUTOR_STATE = {"kv", "runner", "_graphs", "linears", "lora", "kernels", "model"}


def test_the_engine_reaches_the_model_side_only_through_the_executor() -> None:
    wrong = []
    for path in sorted((ROOT / "server/engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loraserve.server.models"):
                allowed = ENGINE_FROM_MODELS.get(node.module or "", set())
                wrong += [f"{path.name} imports {node.module}.{a.name}" for a in node.names if a.name not in allowed]
            elif isinstance(node, ast.Import):
                wrong += [
                    f"{path.name} imports {a.name}" for a in node.names if a.name.startswith("loraserve.server.models")
                ]
            elif isinstance(node, ast.Attribute) and node.attr in EXECUTOR_STATE:
                wrong += [f"{path.name}:{node.lineno} touches .{node.attr}"]
    assert not wrong, wrong


def test_the_trainer_uses_only_model_loading_from_the_server() -> None:
    used = {
        name
        for path in (ROOT / "trainer").glob("*.py")
        for name in imported_modules(path)
        if name.startswith("loraserve.server")
    }
    assert used and all(name.startswith("loraserve.server.models.loading") for name in used), used


def test_value_types_load_without_torch() -> None:
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None
        import loraserve.server.models.types, loraserve.server.engine.stats, loraserve.server.engine.block_manager
        import loraserve.server.engine.step_budget
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_client_works_without_torch() -> None:
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # any "import torch" now fails
        import loraserve.client, loraserve.cli
        from loraserve.client import Client
        client = Client("127.0.0.1:9")
        try:
            client.health(timeout=60)  # a hang guard only: a refused connection fails at once
        except loraserve.client.LoraserveRpcError as error:
            print(error.code.name)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UNAVAILABLE"


def test_adapters_push_and_pull_work_without_torch(tmp_path: Path) -> None:
    result = run_python(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now fails
        from loraserve.cli import main
        print(main(["adapters", "push", {str(tmp_path)!r}, "s3://bucket/prefix"]))  # refused: no manifest
        import loraserve.storage  # what pull uses
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
    assert "loraserve adapters push:" in result.stderr and "no manifest.json" in result.stderr, result.stderr


def test_the_servicer_does_not_load_torch() -> None:
    result = run_python(
        """
        import sys
        import loraserve.server.servicer, loraserve.server.convert, loraserve.server.status, loraserve.server.rpc
        import loraserve.server.http_api.app, loraserve.server.http_api.server
        print("torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_engine_does_not_import_grpc() -> None:
    result = run_python(
        """
        import sys
        import loraserve.server.engine.engine, loraserve.server.models.loading, loraserve.server.retrieval.rag
        import loraserve.server.models.executor
        print(sorted(name for name in sys.modules if name == "grpc" or name.startswith("loraserve.v1")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
