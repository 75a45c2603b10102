"""Telemetry: the Prometheus endpoint's content after a few requests, W3C trace context from the caller continued
through the RPC into the engine's queue, prefill and decode spans, and trace ids in the logs."""

from __future__ import annotations

import logging
import re
import urllib.request

import httpx
import pytest

from loraserve.client import LoraserveRpcError
from tests.conftest import HANG_GUARD_S

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_the_metrics_endpoint_reports_requests_tokens_latency_and_load(start_server, free_port) -> None:
    port, http_port = free_port(), free_port()
    running = start_server(server_options={"metrics_port": port, "http_port": http_port})
    client = running.client
    client.generate("Hello", max_new_tokens=5, min_new_tokens=5)
    list(client.stream("Hello", max_new_tokens=4, min_new_tokens=4))
    with pytest.raises(LoraserveRpcError):
        client.generate("Hello", top_p=7.0)
    model = running.server.engine.loaded.description.name
    completions = f"http://127.0.0.1:{http_port}/v1/completions"
    assert httpx.post(completions, json={"model": model, "prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert httpx.post(completions, json={"model": model, "prompt": "Hi", "top_p": 7}).status_code == 400
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HANG_GUARD_S).read().decode()
    samples = []  # (name, labels, value) of every sample line
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            samples.append((match[1], labels, float(match[3])))

    def value(name: str, **labels: str) -> float:
        found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
        assert found, f"no {name} {labels} in /metrics"
        return sum(found)

    assert value("loraserve_rpc_requests_total", rpc="Generate", code="OK", protocol="grpc") == 1
    assert value("loraserve_rpc_requests_total", rpc="Completions", code="OK", protocol="http") == 1
    assert value("loraserve_rpc_requests_total", rpc="Completions", code="INVALID_ARGUMENT", protocol="http") == 1
    assert value("loraserve_rpc_requests_total", rpc="GenerateStream", code="OK") == 1
    assert value("loraserve_rpc_requests_total", rpc="Generate", code="INVALID_ARGUMENT") == 1
    assert value("loraserve_generated_tokens_total") >= 11
    assert value("loraserve_time_to_first_token_seconds_count") == 3  # two gRPC requests and one HTTP
    assert value("loraserve_inter_token_latency_seconds_count") >= 7
    assert value("loraserve_rpc_duration_seconds_count") >= 3
    assert value("loraserve_batch_size_count") >= 1
    for gauge in ("loraserve_queue_depth", "loraserve_active_requests", "loraserve_kv_cache_used_ratio"):
        assert value(gauge) >= 0


def test_the_callers_trace_continues_into_the_engine(start_server, caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    running = start_server()
    spans = InMemorySpanExporter()
    running.server.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    caplog.set_level(logging.INFO, logger="loraserve")
    result = running.client.generate("Hello", max_new_tokens=3, metadata=[("traceparent", TRACEPARENT)])
    finished = [r for r in caplog.records if r.getMessage() == "request finished" and r.request_id == result.request_id]
    assert finished[0].trace_id == TRACE_ID
    names = {}
    for span in spans.get_finished_spans():
        if format(span.context.trace_id, "032x") == TRACE_ID:
            names[span.name] = span
    assert {"queue", "prefill", "decode"} <= set(names)
    rpc = next(span for name, span in names.items() if name.endswith("InferenceService/Generate"))
    assert all(names[n].parent.span_id == rpc.context.span_id for n in ("queue", "prefill", "decode"))
    assert names["queue"].end_time <= names["prefill"].end_time <= names["decode"].end_time
    assert names["decode"].attributes["request_id"] == result.request_id


def test_prompts_and_outputs_are_logged_only_when_asked(start_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loraserve")
    quiet = start_server()
    quiet.client.generate("a secret prompt", max_new_tokens=2)
    assert not any("secret" in str(r.__dict__) for r in caplog.records)
    loud = start_server(server_options={"log_prompts": True})
    result = loud.client.generate("a logged prompt", max_new_tokens=2)
    finished = [r for r in caplog.records if r.getMessage() == "request finished" and r.request_id == result.request_id]
    assert finished[0].prompt == "a logged prompt" and finished[0].output == result.text
