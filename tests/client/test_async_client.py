"""The asyncio client against a real server: the same results as the blocking client."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loraserve.client import AsyncClient, LoraserveRpcError, StopReason
from tests.conftest import HANG_GUARD_S


def test_async_client_matches_the_sync_client(tiny_server) -> None:
    expected = tiny_server.client.generate("Hello", max_new_tokens=8, min_new_tokens=8)

    async def main() -> None:
        async with AsyncClient(tiny_server.target, timeout=HANG_GUARD_S) as client:
            assert await client.health() == "SERVING"
            result = await client.generate("Hello", max_new_tokens=8, min_new_tokens=8)
            assert result.text == expected.text and result.stop_reason is StopReason.MAX_TOKENS
            chunks = [chunk async for chunk in client.stream("Hello", max_new_tokens=8, min_new_tokens=8)]
            assert "".join(c.text for c in chunks) == expected.text and chunks[-1].finished
            info = await client.model_info()
            assert {a.id for a in info.adapters} == {"alpha", "beta"}
            assert (await client.tokenize("Hello world")).token_count == 2
            answer = await client.rag_query(
                "capital of France", [{"id": "a", "text": "Paris is the capital of France."}], max_new_tokens=4
            )
            assert answer.sources[0].document_id == "a"
            with pytest.raises(LoraserveRpcError) as error:
                await client.generate("hi", top_p=2.0)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_sync_client_rejects_unknown_options(tiny_server) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        tiny_server.client.generate("hi", temprature=0.5)
    with pytest.raises(TypeError, match="not available for rag_query"):
        tiny_server.client.rag_query("q", [{"id": "a", "text": "t"}], logprobs=True)
