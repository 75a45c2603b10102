"""Running the HTTP API: uvicorn on its own thread and asyncio loop, beside the gRPC server, with the same TLS
settings (--tls-cert/--tls-key, and client certificates when --tls-client-ca is set)."""

from __future__ import annotations

import logging
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

from loraserve.config import ServerConfig
from loraserve.errors import ConfigError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 2  # open connections get this long once the engine has ended their requests


class HttpServer:
    """uvicorn serving `app` on --http-port, with at most `max_connections` open. start() returns once it listens;
    stop() closes it."""

    def __init__(self, app: FastAPI, config: ServerConfig, max_connections: int) -> None:
        tls = {}
        if config.tls_cert:
            tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca:
                tls |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.http_port,
                log_config=None,  # loraserve's own logging (JSON lines) carries the request ids
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                # Connections and requests at once, past which uvicorn answers 503: each holds a file descriptor the
                # whole process shares, and a partial body (a slow sender's, until --client-stall-timeout).
                limit_concurrency=max_connections,
                **tls,  # type: ignore[arg-type]
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="loraserve-http", daemon=True)

    def start(self) -> int:
        """Listen; the bound port (--http-port 0 picks a free one)."""
        self._thread.start()
        end = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise ConfigError("--http-port: the HTTP server did not start (is the port in use? see the log)")
            time.sleep(0.01)
        port = int(self._server.servers[0].sockets[0].getsockname()[1])
        logger.info("HTTP API listening", extra={"port": port})
        return port

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=SHUTDOWN_GRACE_S + 5)
