"""The `loraserve` command: client commands against a running server, and `serve` as a real process (health
transitions, SIGTERM draining, configuration errors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraserve.client import Client, LoraserveRpcError
from tests.conftest import DEFAULT_MODEL_TEST_KV, HANG_GUARD_S

LORASERVE = [sys.executable, "-m", "loraserve.cli"]


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LORASERVE, *args], capture_output=True, text=True, timeout=120, input=stdin, env=env or dict(os.environ)
    )


def test_health_exit_code_is_the_container_check(tiny_server, free_port) -> None:
    serving = cli("health", "--target", tiny_server.target)
    assert serving.returncode == 0 and serving.stdout.strip() == "SERVING"
    nobody = cli("health", "--target", f"127.0.0.1:{free_port()}", "--check-timeout", "1")
    assert nobody.returncode == 1 and nobody.stdout.startswith("UNAVAILABLE")


def test_health_does_not_load_torch(tiny_server) -> None:
    code = (
        "import sys; from loraserve.cli import main; "
        f"status = main(['health', '--target', '{tiny_server.target}']); "
        "print('torch' in sys.modules, status)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split()[-2:] == ["False", "0"], result.stderr


def test_generate_prints_the_answer_streamed_or_whole(tiny_server) -> None:
    args = ["generate", "--target", tiny_server.target, "Hello there", "--max-new-tokens", "6", "--min-new-tokens", "6"]
    whole = cli(*args)
    streamed = cli(*args, "--stream")
    assert whole.returncode == 0 and streamed.returncode == 0, whole.stderr + streamed.stderr
    expected = tiny_server.client.generate(
        messages=[{"role": "user", "content": "Hello there"}], max_new_tokens=6, min_new_tokens=6
    ).text
    assert whole.stdout == expected + "\n" and streamed.stdout == expected + "\n"
    as_json = json.loads(cli(*args, "--json", "--raw").stdout)
    assert as_json["generated_token_count"] == 6 and as_json["stop_reason"] == "MAX_TOKENS"
    assert as_json["input_token_count"] == tiny_server.client.tokenize("Hello there").token_count


def test_generate_reports_errors_with_their_code(tiny_server) -> None:
    bad = cli("generate", "--target", tiny_server.target, "hi", "--top-p", "3")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in bad.stderr


def test_generate_takes_an_output_constraint(tiny_server, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    base = ["generate", "--target", tiny_server.target, "Answer:", "--max-new-tokens", "24"]
    from_file = cli(*base, "--json-schema", str(schema_file), "--json")
    assert from_file.returncode == 0, from_file.stderr
    result = json.loads(from_file.stdout)
    assert result["stop_reason"] == "CONSTRAINT_COMPLETE" and isinstance(json.loads(result["text"])["ok"], bool)
    chosen = cli(*base, "--choice", "left, right", "--stream")
    assert chosen.returncode == 0 and chosen.stdout.strip() in ("left", "right"), chosen.stderr
    two = cli(*base, "--regex", "a+", "--choice", "a,b")
    assert two.returncode == 2 and "not allowed with argument" in two.stderr


def test_chat_keeps_the_conversation(tiny_server) -> None:
    result = cli("chat", "--target", tiny_server.target, "--max-new-tokens", "4", stdin="Hi\n/reset\nAgain\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2


def test_info_rag_and_tokenize(tiny_server, tmp_path: Path) -> None:
    info = json.loads(cli("info", "--target", tiny_server.target, "--json").stdout)
    assert {a["id"] for a in info["adapters"]} == {"alpha", "beta"} and info["limits"]["max_new_tokens"] == 64
    text = cli("info", "--target", tiny_server.target).stdout
    assert "adapter alpha: r=4 alpha=16" in text
    assert cli("tokenize", "--target", tiny_server.target, "Hello world").stdout.strip() == "2"
    (tmp_path / "paris.txt").write_text("Paris is the capital of France.")
    (tmp_path / "fruit.txt").write_text("Bananas are yellow.")
    rag = cli(
        "rag",
        "--target",
        tiny_server.target,
        "capital of France",
        "--document",
        str(tmp_path / "paris.txt"),
        "--document",
        str(tmp_path / "fruit.txt"),
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert [s["document_id"] for s in json.loads(rag.stdout)["sources"]] == ["paris.txt"]


def test_configuration_errors_exit_2_with_the_option_named(tiny_model_dir: Path) -> None:
    quantized = cli("serve", "--model", str(tiny_model_dir), "--device", "cpu", "--quantize", "4bit", "--port", "0")
    assert quantized.returncode == 2 and "--quantize 4bit needs a CUDA device" in quantized.stderr
    missing = cli("serve", "--model", "/nonexistent/model", "--port", "0")
    assert missing.returncode == 2 and "--model /nonexistent/model" in missing.stderr
    env = dict(os.environ, LORASERVE_MAX_BATCH_SIZE="zero")
    bad_env = cli("serve", "--port", "0", env=env)
    assert bad_env.returncode == 2 and "LORASERVE_MAX_BATCH_SIZE" in bad_env.stderr
    bad_adapter = cli("serve", "--model", str(tiny_model_dir), "--port", "0", "--adapter", f"x={tiny_model_dir}")
    assert bad_adapter.returncode == 2 and "no adapter_config.json" in bad_adapter.stderr


def start_default_server(
    model_cache_dir: Path, grace_period: float, port: int
) -> tuple[subprocess.Popen, list[str], threading.Thread]:  # type: ignore[type-arg]
    """`loraserve serve` on the real default model (its decoding is slow enough for streams to be in flight); its
    log lines, and the thread that reads them (it ends when the process has closed its stderr)."""
    process = subprocess.Popen(
        [
            *LORASERVE,
            "serve",
            "--model",
            "default",
            "--model-cache",
            str(model_cache_dir),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--grace-period",
            str(grace_period),
            "--kv-cache-memory",
            DEFAULT_MODEL_TEST_KV,
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    logs: list[str] = []
    reader = threading.Thread(target=lambda: logs.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    return process, logs, reader


@pytest.mark.slow
def test_serve_drains_on_sigterm_and_exits_0(model_cache_dir: Path, free_port, wait_for_health) -> None:
    port = free_port()
    # The grace period and the client's deadline are hang guards: on a CPU shared with a build, oversubscribed
    # OpenMP threads can slow decoding tenfold, and the stream must still finish, however long that takes.
    process, logs, reader = start_default_server(model_cache_dir, HANG_GUARD_S, port)
    client = Client(f"127.0.0.1:{port}", timeout=HANG_GUARD_S)
    try:
        wait_for_health(client, "SERVING", process, timeout=300)
        # A stream in flight when SIGTERM arrives runs to its end; new calls are refused meanwhile.
        stream = client.stream("Once upon a time", max_new_tokens=30, min_new_tokens=30)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        wait_for_health(client, "NOT_SERVING", process)
        with pytest.raises(LoraserveRpcError) as not_ready:
            client.ready()
        assert not_ready.value.code.name == "UNAVAILABLE"
        with pytest.raises(LoraserveRpcError) as refused:
            client.generate("hi")
        assert refused.value.code.name == "UNAVAILABLE"
        rest = list(stream)
        # In flight: the first chunk is not the whole answer (how many tokens it holds depends on how soon it was read).
        assert first.generated_token_count < 30 and rest[-1].generated_token_count == 30
        assert rest[-1].stop_reason.name == "MAX_TOKENS"
        assert process.wait(timeout=HANG_GUARD_S) == 0
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
    reader.join(HANG_GUARD_S)  # it has taken the last lines once the process's stderr is closed
    assert not reader.is_alive(), f"hang guard: the log reader still reads after {HANG_GUARD_S:.0f} s"
    records = [json.loads(line) for line in logs if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert {"listening", "serving", "signal received", "draining", "stopped"} <= set(messages)
    assert all("request_id" in r for r in records if r["message"] in ("request received", "request finished"))


@pytest.mark.slow
@pytest.mark.parametrize("second_signal", [False, True])
def test_what_outlasts_the_grace_period_is_cancelled(
    model_cache_dir: Path, second_signal: bool, free_port, wait_for_health
) -> None:
    """The grace period ends (or a second SIGTERM comes) with a stream still running: it ends with CANCELLED and the
    process exits 0."""
    port = free_port()
    process, _, _ = start_default_server(model_cache_dir, 60 if second_signal else 1, port)
    client = Client(f"127.0.0.1:{port}", timeout=120)
    try:
        wait_for_health(client, "SERVING", process, timeout=300)
        stream = client.stream("Once upon a time", max_new_tokens=2000, min_new_tokens=2000)
        next(stream)
        process.send_signal(signal.SIGTERM)
        if second_signal:
            wait_for_health(client, "NOT_SERVING", process)  # the first one was handled: this one comes second
            process.send_signal(signal.SIGTERM)
        with pytest.raises(LoraserveRpcError) as cancelled:
            list(stream)
        assert cancelled.value.code.name == "CANCELLED"
        assert process.wait(timeout=HANG_GUARD_S) == 0
    finally:
        client.close()
        if process.poll() is None:
            process.kill()


def self_signed(folder: Path, name: str, dns_name: str) -> tuple[Path, Path]:
    """A self-signed certificate for dns_name only (not localhost, not 127.0.0.1) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_health_checks_a_server_that_serves_tls_from_the_environment(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mutual: bool
) -> None:
    """The container's case: LORASERVE_TLS_CERT/KEY (and, for mutual TLS, LORASERVE_TLS_CLIENT_CA) configure the
    server, and `loraserve health` runs with the same environment and no CA: it trusts the server's own certificate,
    and presents a client certificate only from LORASERVE_CLIENT_CERT/KEY."""
    from loraserve.config import ServerConfig, from_env

    for name in [name for name in os.environ if name.startswith("LORASERVE_")]:
        monkeypatch.delenv(name)
    cert, key = self_signed(tmp_path, "server", "loraserve.internal")
    client_cert, client_key = self_signed(tmp_path, "client", "health-check")
    monkeypatch.setenv("LORASERVE_TLS_CERT", str(cert))
    monkeypatch.setenv("LORASERVE_TLS_KEY", str(key))
    if mutual:
        monkeypatch.setenv("LORASERVE_TLS_CLIENT_CA", str(client_cert))
    tls = from_env(ServerConfig)
    options = {"tls_cert": tls.tls_cert, "tls_key": tls.tls_key, "tls_client_ca": tls.tls_client_ca}
    running = start_server(load=True, server_options=options)
    env = dict(os.environ, LORASERVE_TARGET=f"localhost:{running.port}")
    if mutual:
        anonymous = cli("health", "--check-timeout", "10", env=env)
        assert anonymous.returncode == 1 and anonymous.stdout.startswith("UNAVAILABLE"), anonymous.stderr
        env |= {"LORASERVE_CLIENT_CERT": str(client_cert), "LORASERVE_CLIENT_KEY": str(client_key)}
    result = cli("health", "--check-timeout", "10", env=env)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING", result.stdout + result.stderr
