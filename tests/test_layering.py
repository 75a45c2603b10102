"""The arrows run one way: the client and the CLI's client commands work without torch, the servicer never loads
torch itself, and the engine never imports grpc."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
            client.health(timeout=0.5)
        except loraserve.client.LoraserveRpcError as error:
            print(error.code.name)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UNAVAILABLE"


def test_the_servicer_does_not_load_torch() -> None:
    result = run_python(
        """
        import sys
        import loraserve.server.servicer, loraserve.server.convert, loraserve.server.status
        print("torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_engine_does_not_import_grpc() -> None:
    result = run_python(
        """
        import sys
        import loraserve.server.engine, loraserve.server.loading, loraserve.server.rag
        print(sorted(name for name in sys.modules if name == "grpc" or name.startswith("loraserve.v1")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
