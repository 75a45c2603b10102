"""Configuration: every dataclass field is a flag and a LORASERVE_* variable; flags beat the environment, which beats
the default; bad values name the option."""

from __future__ import annotations

import argparse
import urllib.request
from dataclasses import fields

import pytest

from loraserve.cli import SERVE_CONFIGS, build_parser
from loraserve.config import (
    ClientConfig,
    EngineConfig,
    ModelConfig,
    ServerConfig,
    add_options,
    env_name,
    flag_name,
    from_namespace,
)
from loraserve.errors import ConfigError
from tests.conftest import HANG_GUARD_S


def parse(config_cls: type, argv: list[str]):
    parser = argparse.ArgumentParser()
    add_options(parser, config_cls)
    return from_namespace(config_cls, parser.parse_args(argv))


def test_defaults_when_nothing_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for f in fields(EngineConfig):
        monkeypatch.delenv(env_name(f), raising=False)
    assert parse(EngineConfig, []) == EngineConfig()


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("LORASERVE_MAX_TOP_N", "3")
    config = parse(EngineConfig, ["--max-batch-size", "4"])
    assert config.max_batch_size == 4
    assert config.max_top_n == 3
    assert config.max_queued_requests == EngineConfig().max_queued_requests


def test_repeatable_flags_and_comma_separated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_ADAPTER", "a=/x, b=/y")
    assert parse(ModelConfig, []).adapter == ("a=/x", "b=/y")
    assert parse(ModelConfig, ["--adapter", "c=/z"]).adapter == ("c=/z",)


def test_bad_environment_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_PORT", "http")
    with pytest.raises(ConfigError, match="LORASERVE_PORT"):
        parse(ServerConfig, [])
    monkeypatch.setenv("LORASERVE_PORT", "1")
    monkeypatch.setenv("LORASERVE_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="LORASERVE_DEVICE='tpu': choose one of auto, cpu, cuda"):
        parse(ModelConfig, [])


@pytest.mark.parametrize(
    ("config_cls", "argv", "message"),
    [
        (EngineConfig, ["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (EngineConfig, ["--prefill-burst-ratio", "-1"], "--prefill-burst-ratio must be >= 0"),
        (EngineConfig, ["--default-max-new-tokens", "99", "--max-new-tokens", "10"], "--default-max-new-tokens"),
        (ServerConfig, ["--port", "70000"], "--port must be in"),
        (ModelConfig, ["--adapter", "nopath"], "--adapter takes NAME=PATH"),
    ],
)
def test_invalid_values_name_the_flag(config_cls: type, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(config_cls, argv)


def test_serve_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for config_cls in SERVE_CONFIGS:
        for f in fields(config_cls):
            assert flag_name(f) in text
            assert env_name(f) in text


def test_the_server_listens_on_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORASERVE_HOST", "LORASERVE_METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    config = parse(ServerConfig, [])
    assert (config.host, config.metrics_host) == ("127.0.0.1", "")  # "": /metrics on --host
    assert parse(ServerConfig, ["--host", "0.0.0.0", "--metrics-host", "127.0.0.1"]).metrics_host == "127.0.0.1"


def test_metrics_are_served_on_the_metrics_host(start_server, free_port) -> None:
    port = free_port()
    start_server(load=False, server_options={"metrics_port": port, "metrics_host": "127.0.0.2"})
    assert urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=HANG_GUARD_S).status == 200
    with pytest.raises(OSError):  # not on --host (127.0.0.1)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HANG_GUARD_S)


def test_no_environment_variable_sets_both_a_server_and_a_client_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's environment configures its server and its health check at once: LORASERVE_TLS_CERT is the
    server's certificate, never a client certificate."""
    server_names = {env_name(f) for config_cls in SERVE_CONFIGS for f in fields(config_cls)}
    assert not server_names & {env_name(f) for f in fields(ClientConfig)}
    monkeypatch.setenv("LORASERVE_TLS_CERT", "/etc/loraserve/server.crt")
    monkeypatch.setenv("LORASERVE_TLS_KEY", "/etc/loraserve/server.key")
    monkeypatch.delenv("LORASERVE_CLIENT_CERT", raising=False)
    assert parse(ClientConfig, []).client_cert == ""
    monkeypatch.setenv("LORASERVE_CLIENT_CERT", "/etc/loraserve/client.crt")
    config = parse(ClientConfig, ["--client-key", "/k"])
    assert (config.client_cert, config.client_key) == ("/etc/loraserve/client.crt", "/k")
