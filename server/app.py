"""Building, starting and stopping the gRPC server: InferenceService, grpc.health.v1 health, server reflection, the
OpenAI-compatible HTTP API beside it (--http-port), and the signal handling of `loraserve serve`.

Health tells the truth: NOT_SERVING while the model loads, SERVING once it is loaded and warmed up, NOT_SERVING again
while draining or when the engine dies. Both the overall service ("") and loraserve.v1.InferenceService report it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.config import EngineConfig, ModelConfig, RagConfig, ServerConfig
from loraserve.errors import ConfigError
from loraserve.server.concurrency import BACKLOG_FACTOR, SPARE_THREADS, ConcurrencyLimit
from loraserve.server.engine.telemetry import Telemetry
from loraserve.server.http_api.app import HttpApi
from loraserve.server.http_api.server import HttpServer
from loraserve.server.interceptors import AccessInterceptor, MalformedRequestInterceptor
from loraserve.server.models import preflight
from loraserve.server.retrieval.retriever import Retriever
from loraserve.server.servicer import AdapterServicer, CollectionServicer, InferenceServicer
from loraserve.server.stall_guard import StallGuard
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from loraserve.server.engine.engine import Engine

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADAPTER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterService"].full_name
COLLECTION_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CollectionService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
SIGNAL_POLL_S = 0.2


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key, requiring client certificates when --tls-client-ca is set."""
    if not config.tls_cert:
        return None
    try:
        key, chain = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as error:
        raise ConfigError(f"--tls-cert/--tls-key/--tls-client-ca: {error}") from None
    return grpc.ssl_server_credentials(
        ((key, chain),), root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass
class EngineStartup:
    """What the engine thread hands back to load(): the running engine, or the error that stopped it."""

    ready: threading.Event = field(default_factory=threading.Event)
    engine: Engine | None = None
    error: BaseException | None = None


class LoraServer:
    """The gRPC server and the engine behind it. start() listens at once (health NOT_SERVING); load() brings the
    model up (SERVING); drain() and stop() take it down."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        server_config: ServerConfig,
        rag_config: RagConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.engine_config = engine_config
        self.server_config = server_config
        self.rag_config = rag_config or RagConfig()
        self.retriever = Retriever(self.rag_config)
        self.servicer = InferenceServicer(self.retriever, self.rag_config)
        self.adapter_servicer = AdapterServicer(model_config)
        self.collection_servicer = CollectionServicer(self.retriever, self.rag_config)
        self.health = health.HealthServicer()
        self.engine: Engine | None = None
        self.telemetry: Telemetry | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.Server | None = None
        self.stall_guard: StallGuard | None = None
        self.concurrency: ConcurrencyLimit | None = None
        self._http: HttpServer | None = None
        self._serving = False

    def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until load()); return the bound port."""
        preflight.check(self.model_config)  # before the ports are bound and torch is imported
        calls = self.server_config.grpc_workers or (
            self.engine_config.max_batch_size + self.engine_config.max_queued_requests + SPARE_THREADS
        )
        config = self.server_config
        logger.info("embedding model", extra={"embedding_model": self.retriever.embedder.identity})  # checks it
        self.telemetry = Telemetry(config.metrics_port, config.metrics_host or config.host)
        for servicer in (self.servicer, self.adapter_servicer, self.collection_servicer):
            servicer.telemetry = self.telemetry
        access = AccessInterceptor(config)  # one for both protocols: a client's rate limit counts both
        from opentelemetry.instrumentation.grpc import filters, server_interceptor

        not_probes = filters.negate(filters.health_check())

        self.concurrency = ConcurrencyLimit(calls)
        self.stall_guard = StallGuard(config.client_stall_timeout)
        self.servicer.stall_guard = self.stall_guard
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=calls + SPARE_THREADS, thread_name_prefix="loraserve-rpc"),
            # Tracing first, so that refused calls are traced too; access before the limit, so that calls without a
            # valid token never hold a slot.
            interceptors=[
                # Not around health: a wrapped Watch would lose grpc's non-blocking form and hold a thread each.
                server_interceptor(tracer_provider=self.telemetry.tracer_provider, filter_=not_probes),
                access,
                self.concurrency,
                MalformedRequestInterceptor(),
            ],
            # A backstop far above what the limits above let build up: only a flood of quick calls reaches it.
            maximum_concurrent_rpcs=BACKLOG_FACTOR * (calls + SPARE_THREADS),
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # grpc binds with SO_REUSEPORT by default: a second server on a port in use would start silently
                # and the kernel would split the connections between the two (a client's answer then depends on
                # which process it reached). Without it, a busy port is an error at start.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)
        pb_grpc.add_AdapterServiceServicer_to_server(self.adapter_servicer, server)
        pb_grpc.add_CollectionServiceServicer_to_server(self.collection_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                ADAPTER_SERVICE_NAME,
                COLLECTION_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        try:
            self.port = (
                server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
            )
        except RuntimeError:  # grpc's "Failed to bind to address"
            raise ConfigError(
                f"--port {config.port}: cannot listen on {address}; is another server using it?"
            ) from None
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server.start()
        self._server = server
        if config.http_port:
            api = HttpApi(
                lambda: self.servicer.engine,
                lambda: self._serving,
                access,
                self.telemetry,
                config.max_message_bytes,
                config.client_stall_timeout,
            )
            self._http = HttpServer(api.build(), config, calls + SPARE_THREADS)
            self.http_port = self._http.start()
        logger.info(
            "listening",
            extra={
                "address": address,
                "port": self.port,
                "max_concurrent_calls": calls,
                "tls": bool(credentials),
                "mutual_tls": bool(config.tls_client_ca),
            },
        )
        return self.port

    def load(self) -> None:
        """Load and warm up the model on the engine's own thread, then report SERVING. Every torch op runs on that
        one thread (see Engine.run); a loading error is raised here."""
        started = EngineStartup()
        thread = threading.Thread(target=self._run_engine, args=(started,), name="loraserve-engine", daemon=True)
        thread.start()
        started.ready.wait()
        if started.error is not None:
            thread.join()
            raise started.error
        engine = started.engine
        assert engine is not None
        self.engine = engine
        self.servicer.attach(engine)
        self.adapter_servicer.attach(engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving",
            extra={"model": engine.loaded.description.name, "adapters": [a.id for a in engine.adapters.infos()]},
        )

    def _run_engine(self, started: EngineStartup) -> None:
        from loraserve.server.engine.engine import Engine
        from loraserve.server.models.loading import load_model

        try:
            engine = Engine(
                load_model(self.model_config),
                self.engine_config,
                on_failure=self._engine_failed,
                telemetry=self.telemetry,
                log_prompts=self.server_config.log_prompts,
            )
            engine.warm_up()
        except BaseException as error:  # handed to load(), which raises it on the caller's thread
            started.error = error
            started.ready.set()
            return
        started.engine = engine
        engine.run(on_ready=started.ready.set)

    def drain(self) -> None:
        """Report NOT_SERVING and refuse new requests (UNAVAILABLE); requests in flight go on."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None:
            self.engine.drain()
        logger.info("draining")

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to timeout for in-flight requests to finish; True when none is left."""
        return self.engine is None or self.engine.wait_idle(timeout)

    def stop(self) -> None:
        """Stop the engine (what is left ends as CANCELLED) and the server."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None:
            self.engine.stop()
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
        if self._http is not None:
            self._http.stop()
        if self.stall_guard is not None:
            self.stall_guard.stop()
        self.retriever.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        logger.info("stopped")

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in HEALTH_SERVICES:
            self.health.set(service, status)

    def _engine_failed(self, error: BaseException) -> None:
        logger.critical("reporting NOT_SERVING: the engine died", extra={"error": repr(error)})
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)


def serve(
    model_config: ModelConfig, engine_config: EngineConfig, server_config: ServerConfig, rag_config: RagConfig
) -> int:
    """Run until SIGTERM or SIGINT; then drain for the grace period and exit 0. A second signal ends the drain at
    once (what is left ends as CANCELLED)."""
    signals: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signal.Signals(signum).name)
        logger.info("signal received", extra={"signal": signals[-1]})

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = LoraServer(model_config, engine_config, server_config, rag_config)
    server.start()
    try:
        server.load()
        while not signals:
            time.sleep(SIGNAL_POLL_S)
        server.drain()
        end = time.monotonic() + server_config.grace_period
        while len(signals) < 2 and time.monotonic() < end:
            if server.wait_idle(min(SIGNAL_POLL_S, max(end - time.monotonic(), 0))):
                break
    finally:
        server.stop()
    return 0
