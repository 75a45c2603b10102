"""OpenTelemetry: the metrics a platform alarms on and the traces that explain a slow request.

Metrics (exported on a Prometheus /metrics endpoint, and over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, for the
AWS Distro for OpenTelemetry collector and CloudWatch): requests by RPC and status code, RPC latency, time to first
token, inter-token latency, generated tokens, queue depth, running requests, batch size, KV cache use, adapter loads.
Traces: gRPC instrumentation makes a span per RPC, continuing the caller's W3C trace context from the request
metadata; each generation request adds child spans for its time in the queue, its prefill and its decode. Spans go
out over OTLP when the endpoint is set.

The providers are this object's own (not OpenTelemetry's process-wide globals), so several servers can share a
process, as they do in the tests. No grpc imports: the engine records here too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Telemetry:
    """The process's meter and tracer, their exporters, and loraserve's instruments."""

    def __init__(self, metrics_port: int = 0, metrics_host: str = "0.0.0.0") -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "loraserve")})
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        otlp = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        views = [
            View(
                instrument_name="loraserve.rpc.duration",
                aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S),
            ),
            View(
                instrument_name="loraserve.time_to_first_token",
                aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S),
            ),
            View(
                instrument_name="loraserve.inter_token_latency",
                aggregation=ExplicitBucketHistogramAggregation(TOKEN_LATENCY_BUCKETS_S),
            ),
            View(instrument_name="loraserve.batch_size", aggregation=ExplicitBucketHistogramAggregation(BATCH_BUCKETS)),
        ]
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
        self.tracer_provider = TracerProvider(resource=resource)
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.tracer_provider.get_tracer("loraserve")
        self._instruments(self.meter_provider.get_meter("loraserve"))
        self._http: Any = None
        if metrics_port:
            from prometheus_client import start_http_server

            self._http, _ = start_http_server(metrics_port, metrics_host, registry=self.registry)
            logger.info("metrics endpoint", extra={"port": metrics_port, "path": "/metrics", "otlp": otlp})

    def _instruments(self, meter: Any) -> None:
        self.rpc_requests = meter.create_counter("loraserve.rpc.requests", description="RPCs by method and status")
        self.rpc_duration = meter.create_histogram("loraserve.rpc.duration", unit="s", description="RPC latency")
        self.time_to_first_token = meter.create_histogram(
            "loraserve.time_to_first_token", unit="s", description="From arrival to the first generated token"
        )
        self.inter_token_latency = meter.create_histogram(
            "loraserve.inter_token_latency", unit="s", description="Between two tokens of one request"
        )
        self.generated_tokens = meter.create_counter("loraserve.generated_tokens", description="Tokens generated")
        self.batch_size = meter.create_histogram("loraserve.batch_size", description="Requests in a model step")
        self.adapter_loads = meter.create_counter("loraserve.adapter.loads", description="Adapter loads by outcome")
        self._gauges: dict[str, Callable[[], float]] = {}
        for name, description in (
            ("loraserve.queue_depth", "Requests waiting for a batch slot"),
            ("loraserve.active_requests", "Requests being decoded"),
            ("loraserve.kv_cache.used_ratio", "Share of the KV cache blocks held by running requests"),
        ):
            meter.create_observable_gauge(name, callbacks=[self._observer(name)], description=description)

    def _observer(self, name: str) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(_: CallbackOptions) -> list[Observation]:
            read = self._gauges.get(name)
            return [Observation(read())] if read is not None else []

        return observe

    def watch(self, name: str, read: Callable[[], float]) -> None:
        """Report `read()` as gauge `name` (queue_depth, active_requests, kv_cache.used_ratio) at each collection."""
        self._gauges[f"loraserve.{name}"] = read

    def rpc_finished(self, rpc: str, code: str, seconds: float, protocol: str = "grpc") -> None:
        """One call ended: `rpc` is the method (or HTTP route), `code` its gRPC status name (the HTTP API reports
        the status its error maps to), `protocol` grpc or http."""
        attributes = {"rpc": rpc, "code": code, "protocol": protocol}
        self.rpc_requests.add(1, attributes)
        self.rpc_duration.record(seconds, attributes)

    def request_spans(
        self,
        parent: otel_context.Context | None,
        arrival_ns: int,
        admitted_ns: int | None,
        first_token_ns: int | None,
        end_ns: int,
        attributes: dict[str, Any],
    ) -> None:
        """queue, prefill and decode spans of one finished request, under the RPC's span."""
        phases = [("queue", arrival_ns, admitted_ns or end_ns)]
        if admitted_ns is not None:
            phases.append(("prefill", admitted_ns, first_token_ns or end_ns))
        if first_token_ns is not None:
            phases.append(("decode", first_token_ns, end_ns))
        for name, start, end in phases:
            span = self.tracer.start_span(name, context=parent, start_time=start, attributes=attributes)
            span.end(end_time=max(end, start))

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def wall_ns(monotonic: float) -> int:
    """A time.monotonic() reading as wall-clock nanoseconds (what spans carry)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)
