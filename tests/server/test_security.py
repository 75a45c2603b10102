"""TLS and mutual TLS with certificates made in the test, bearer-token authentication with admin tokens, and
per-client rate limiting."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from loraserve.client import Client, LoraserveRpcError
from loraserve.client.client import tls_credentials
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc


def _write_pair(folder: Path, name: str, key, cert) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, san: list | None = None):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("loraserve test CA", ca_key, "loraserve test CA", ca_key, True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate("localhost", server_key, "loraserve test CA", ca_key, False, san)
    client = certificate("a client", client_key, "loraserve test CA", ca_key, False)
    _, ca_path = _write_pair(folder, "ca", ca_key, ca)
    server_key_path, server_path = _write_pair(folder, "server", server_key, server)
    client_key_path, client_path = _write_pair(folder, "client", client_key, client)
    return {
        "ca": ca_path,
        "server_key": server_key_path,
        "server": server_path,
        "client_key": client_key_path,
        "client": client_path,
    }


def test_tls_serves_clients_that_verify_it_and_refuses_plaintext(start_server, pki) -> None:
    running = start_server(
        server_options={"tls_cert": str(pki["server"]), "tls_key": str(pki["server_key"])},
        client_options={"credentials": tls_credentials(str(pki["ca"]))},
    )
    assert running.client.generate("Hello", max_new_tokens=2).generated_token_count == 2
    with Client(running.target, timeout=5) as plaintext, pytest.raises(LoraserveRpcError) as error:
        plaintext.health()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(start_server, pki) -> None:
    running = start_server(
        server_options={
            "tls_cert": str(pki["server"]),
            "tls_key": str(pki["server_key"]),
            "tls_client_ca": str(pki["ca"]),
        },
        client_options={"credentials": tls_credentials(str(pki["ca"]), str(pki["client"]), str(pki["client_key"]))},
    )
    assert running.client.health() == "SERVING"
    with Client(running.target, timeout=5, credentials=tls_credentials(str(pki["ca"]))) as anonymous:
        with pytest.raises(LoraserveRpcError) as error:
            anonymous.health()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def secured(start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Users' tokens from a secret file, an admin token from the environment."""
    tokens = tmp_path / "tokens"
    tokens.write_text("user-token\n\nsecond-user\n")
    monkeypatch.setenv("LORASERVE_ADMIN_TOKENS", "admin-token")
    return start_server(server_options={"auth_tokens_file": str(tokens)}, client_options={"token": "user-token"})


def test_bearer_tokens_are_checked(secured) -> None:
    assert secured.client.generate("Hello", max_new_tokens=1).generated_token_count == 1
    for token, fragment in ((None, "needs a bearer token"), ("wrong", "not valid")):
        with Client(secured.target, timeout=10, token=token) as client, pytest.raises(LoraserveRpcError) as error:
            client.generate("Hello", max_new_tokens=1)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED and fragment in error.value.details
    with Client(secured.target, timeout=10) as anonymous:  # probes need no token
        assert anonymous.health() == "SERVING"
        anonymous.ready()
    with Client(secured.target, timeout=10, token="second-user") as other:
        assert other.model_info().model_name


def test_adapter_service_needs_an_admin_token(secured) -> None:
    def list_adapters(token: str) -> pb.ListAdaptersResponse:
        stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(secured.target))
        return stub.ListAdapters(pb.ListAdaptersRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)

    with pytest.raises(grpc.RpcError) as error:
        list_adapters("user-token")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {a.id for a in list_adapters("admin-token").adapters} == {"alpha", "beta"}
    with Client(secured.target, timeout=10, token="admin-token") as admin:  # an admin may also generate
        assert admin.generate("Hi", max_new_tokens=1).generated_token_count == 1


def test_rate_limits_are_per_client_and_say_when_to_retry(start_server, monkeypatch) -> None:
    monkeypatch.setenv("LORASERVE_AUTH_TOKENS", "a,b")
    running = start_server(server_options={"rate_limit": 0.5, "rate_burst": 2}, client_options={"token": "a"})
    running.client.tokenize("one")
    running.client.tokenize("two")
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(running.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest(text="three"), metadata=(("authorization", "Bearer a"),), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in error.value.details()
    retry_ms = int(dict(error.value.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 2000
    with Client(running.target, timeout=10, token="b") as other:  # another client has its own budget
        assert other.tokenize("hello").token_count
    assert running.client.health() == "SERVING"  # probes are never limited


def test_changing_collections_needs_an_admin_token(secured) -> None:
    document = [{"id": "d", "text": "Paris is the capital of France."}]
    with pytest.raises(LoraserveRpcError) as error:
        secured.client.upsert_documents("kb", document)
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.value.details == "loraserve.v1.CollectionService/UpsertDocuments needs an admin token"
    with Client(secured.target, timeout=30, token="admin-token") as admin:
        assert admin.upsert_documents("kb", document).upserted_documents == 1
    client = secured.client
    for change in (lambda: client.delete_documents("kb", ["d"]), lambda: client.delete_collection("kb")):
        with pytest.raises(LoraserveRpcError) as error:
            change()
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [c.name for c in secured.client.list_collections()] == ["kb"]  # reading needs a user's token only
    answer = secured.client.rag_query("What is the capital of France?", collection="kb", max_new_tokens=2)
    assert [s.document_id for s in answer.sources] == ["d"]


def test_the_http_api_uses_the_same_tls_and_rate_limit(start_server, pki, free_port, monkeypatch) -> None:
    import ssl

    import httpx

    monkeypatch.setenv("LORASERVE_AUTH_TOKENS", "a")
    running = start_server(
        server_options={
            "tls_cert": str(pki["server"]),
            "tls_key": str(pki["server_key"]),
            "http_port": free_port(),
            "rate_limit": 0.01,  # a token per 100 s: the third call is limited however slow the machine
            "rate_burst": 2,
        },
        client_options={"credentials": tls_credentials(str(pki["ca"])), "token": "a"},
    )
    base = f"https://127.0.0.1:{running.server.http_port}"
    headers = {"authorization": "Bearer a"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca"])), timeout=30) as https:
        assert https.get(f"{base}/v1/models", headers=headers).status_code == 200
        running.client.tokenize("one")  # the same client's gRPC call takes from the same bucket
        limited = https.get(f"{base}/v1/models", headers=headers)
        assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(limited.headers["retry-after"]) <= 100
        assert https.get(f"{base}/health").status_code == 200  # probes are never limited
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP gets no answer from a TLS port
        httpx.get(f"http://127.0.0.1:{running.server.http_port}/health", timeout=5)
