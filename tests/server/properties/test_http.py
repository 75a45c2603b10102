"""Property tests of the OpenAI-compatible HTTP API: /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from hypothesis import given

from tests.server.properties.checks import check_http, check_serving, short
from tests.server.properties.conftest import ErrorLog, Served
from tests.server.properties.strategies import MARKS, http_bodies, run_examples

pytestmark = MARKS


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_http_api(served: Served, channel: grpc.Channel, error_log: ErrorLog, chat: bool) -> None:
    with httpx.Client(base_url=served.http, timeout=120) as client:

        @run_examples(120)
        @given(body=http_bodies(served, chat))
        def check(body: dict[str, Any]) -> None:
            try:
                check_http(served, client, body, chat)
            except AssertionError as error:
                raise AssertionError(f"{error}; log: {error_log.take()}") from None
            check_serving(channel, error_log, f"POST {short(body)}")

        check()
