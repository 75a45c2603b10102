"""The clients cover the whole contract: every RPC of every service has a call description that both Client and
AsyncClient run; adapters are loaded, listed and unloaded from Python (sync and async) and from the CLI, with every
field the server reports."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from loraserve.client import AsyncClient, Client, LoraserveRpcError
from loraserve.client import client as client_module
from loraserve.config import ModelConfig
from loraserve.v1 import inference_pb2 as pb

SERVICES = {"inference": "InferenceService", "adapters": "AdapterService", "collections": "CollectionService"}


def described_calls() -> set[tuple[str, str]]:
    """(service, method) of every Call(...) written in the client module."""
    tree = ast.parse(Path(client_module.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Call":
            service, method = (arg.value for arg in node.args[:2] if isinstance(arg, ast.Constant))
            found.add((service, method))
    return found


def test_every_rpc_of_the_contract_has_a_call_that_both_clients_run() -> None:
    contract = {
        (key, method.name)
        for key, service in SERVICES.items()
        for method in pb.DESCRIPTOR.services_by_name[service].methods
    }
    assert contract - described_calls() == set()
    assert ("health", "Check") in described_calls()
    # the descriptions live in the shared base; the two clients only run them
    for cls in (Client, AsyncClient):
        own = {name for name in vars(cls) if not name.startswith("_")}
        assert own <= {"close"}, own


@pytest.fixture
def root_server(start_server, tiny_model_config: ModelConfig, adapter_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    """A server whose adapter root holds the test adapters, with none loaded at start."""
    config = replace(tiny_model_config, adapter=(), adapter_root=str(adapter_dirs["alpha"].parent))
    return start_server(model_config=config, max_adapters=2)


def test_the_sync_client_loads_lists_and_unloads_adapters(root_server, adapter_dirs) -> None:
    client = root_server.client
    loaded = client.load_adapter("b", adapter_dirs["beta"].name)
    assert loaded.adapter.id == "b" and loaded.adapter.rank == 8 and loaded.evicted == ()
    assert loaded.adapter.target_modules == ("q_proj", "v_proj") and loaded.adapter.source.endswith(
        adapter_dirs["beta"].name
    )
    listing = client.list_adapters()
    assert [a.id for a in listing.adapters] == ["b"] and listing.max_adapters == 2
    assert listing.adapters[0].active_requests == 0
    assert client.generate("Hi", adapter_id="b", max_new_tokens=2).generated_token_count == 2
    client.unload_adapter("b")
    assert client.list_adapters().adapters == ()
    with pytest.raises(LoraserveRpcError) as error:
        client.unload_adapter("b")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_the_async_client_does_the_same_and_answers_ready(root_server, adapter_dirs) -> None:
    async def main() -> None:
        async with AsyncClient(root_server.target, timeout=60) as client:
            await client.ready()
            loaded = await client.load_adapter("a", adapter_dirs["alpha"].name)
            assert loaded.adapter.rank == 4
            assert [a.id for a in (await client.list_adapters()).adapters] == ["a"]
            await client.unload_adapter("a")
            assert (await client.list_adapters()).adapters == ()
            upserted = await client.upsert_documents("notes", [{"id": "1", "text": "Paris is in France."}])
            assert upserted.collection.document_count == 1
            assert [c.name for c in await client.list_collections()] == ["notes"]
            assert (await client.delete_documents("notes", ["1", "2"])).not_found == ("2",)
            await client.delete_collection("notes")

    asyncio.run(main())


def test_the_adapters_command(root_server, adapter_dirs) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "loraserve.cli", "adapters", *args, "--target", root_server.target]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    loaded = cli("load", "b", adapter_dirs["beta"].name)
    assert loaded.returncode == 0 and loaded.stdout.startswith("b: rank 8"), loaded.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert [a["id"] for a in listed["adapters"]] == ["b"] and listed["max_adapters"] == 2
    assert cli("unload", "b").stdout.strip() == "unloaded b"
    missing = cli("unload", "b")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
