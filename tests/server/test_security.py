"""TLS and mutual TLS with certificates made in the test, bearer-token authentication with admin tokens, admin calls
closed by default (one table classifies every method), and per-client rate limiting (keyed so that neither a made-up
token, another protocol nor a flood of new clients gets around it)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest

from loraserve.client import Client, LoraserveRpcError
from loraserve.client.client import tls_credentials
from loraserve.config import ServerConfig
from loraserve.errors import ConfigError
from loraserve.server import interceptors
from loraserve.server.interceptors import METHOD_ACCESS, Access, AccessInterceptor, TokenBucket, access_of
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S


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
    with Client(running.target, timeout=HANG_GUARD_S) as plaintext, pytest.raises(LoraserveRpcError) as error:
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
    with Client(running.target, timeout=HANG_GUARD_S, credentials=tls_credentials(str(pki["ca"]))) as anonymous:
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
        with (
            Client(secured.target, timeout=HANG_GUARD_S, token=token) as client,
            pytest.raises(LoraserveRpcError) as error,
        ):
            client.generate("Hello", max_new_tokens=1)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED and fragment in error.value.details
    with Client(secured.target, timeout=HANG_GUARD_S) as anonymous:  # probes need no token
        assert anonymous.health() == "SERVING"
        anonymous.ready()
    with Client(secured.target, timeout=HANG_GUARD_S, token="second-user") as other:
        assert other.model_info().model_name


def test_adapter_service_needs_an_admin_token(secured) -> None:
    def list_adapters(token: str) -> pb.ListAdaptersResponse:
        stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(secured.target))
        return stub.ListAdapters(
            pb.ListAdaptersRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=HANG_GUARD_S
        )

    with pytest.raises(grpc.RpcError) as error:
        list_adapters("user-token")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {a.id for a in list_adapters("admin-token").adapters} == {"alpha", "beta"}
    with Client(secured.target, timeout=HANG_GUARD_S, token="admin-token") as admin:  # an admin may also generate
        assert admin.generate("Hi", max_new_tokens=1).generated_token_count == 1


def test_rate_limits_are_per_client_and_say_when_to_retry(start_server, monkeypatch) -> None:
    monkeypatch.setenv("LORASERVE_AUTH_TOKENS", "a,b")
    # A token per 100 s: the third call is limited however slow the machine.
    running = start_server(server_options={"rate_limit": 0.01, "rate_burst": 2}, client_options={"token": "a"})
    running.client.tokenize("one")
    running.client.tokenize("two")
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(running.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest(text="three"), metadata=(("authorization", "Bearer a"),), timeout=HANG_GUARD_S)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in error.value.details()
    retry_ms = int(dict(error.value.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 100_000  # at most the time one token takes to come back
    with Client(running.target, timeout=HANG_GUARD_S, token="b") as other:  # another client has its own budget
        assert other.tokenize("hello").token_count
    assert running.client.health() == "SERVING"  # probes are never limited


def test_changing_collections_needs_an_admin_token(secured) -> None:
    document = [{"id": "d", "text": "Paris is the capital of France."}]
    with pytest.raises(LoraserveRpcError) as error:
        secured.client.upsert_documents("kb", document)
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.value.details == "loraserve.v1.CollectionService/UpsertDocuments needs an admin token"
    with Client(secured.target, timeout=HANG_GUARD_S, token="admin-token") as admin:
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
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca"])), timeout=HANG_GUARD_S) as https:
        assert https.get(f"{base}/v1/models", headers=headers).status_code == 200
        running.client.tokenize("one")  # the same client's gRPC call takes from the same bucket
        limited = https.get(f"{base}/v1/models", headers=headers)
        assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(limited.headers["retry-after"]) <= 100
        assert https.get(f"{base}/health").status_code == 200  # probes are never limited
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP gets no answer from a TLS port
        httpx.get(f"http://127.0.0.1:{running.server.http_port}/health", timeout=5)


# ---- access control without a server: the method table, admin calls, rate-limit keys -------------------------------

TOKENIZE = "/loraserve.v1.InferenceService/Tokenize"
LIST_ADAPTERS = "/loraserve.v1.AdapterService/ListAdapters"


def interceptor(monkeypatch: pytest.MonkeyPatch, auth: str = "", admin: str = "", **options) -> AccessInterceptor:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LORASERVE_AUTH_TOKENS", auth)
    monkeypatch.setenv("LORASERVE_ADMIN_TOKENS", admin)
    return AccessInterceptor(ServerConfig(**options))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def served_methods() -> list[str]:
    """Every method of every service in the generated descriptors: loraserve.v1's (every proto file), health's and
    reflection's."""
    import importlib
    import pkgutil

    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    import loraserve.v1

    ours = [
        importlib.import_module(f"loraserve.v1.{module.name}").DESCRIPTOR
        for module in pkgutil.iter_modules(loraserve.v1.__path__)
        if module.name.endswith("_pb2")
    ]
    assert pb.DESCRIPTOR in ours
    return [
        f"/{service.full_name}/{method.name}"
        for descriptor in (*ours, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        for service in descriptor.services_by_name.values()
        for method in service.methods
    ]


def test_every_method_is_classified_and_nothing_else() -> None:
    methods = served_methods()
    unclassified = [m for m in methods if m not in METHOD_ACCESS]
    assert not unclassified, f"add these to interceptors.METHOD_ACCESS (open, read or admin): {unclassified}"
    assert set(METHOD_ACCESS) == set(methods)  # no entry for a method that no longer exists
    opened = {m for m, access in METHOD_ACCESS.items() if access is Access.OPEN}
    assert opened == {m for m in methods if m.startswith(("/grpc.", "/loraserve.v1.InferenceService/Ready"))}
    assert all(METHOD_ACCESS[m] is Access.ADMIN for m in methods if "/loraserve.v1.AdapterService/" in m)
    assert {
        m.rsplit("/", 1)[1]
        for m, access in METHOD_ACCESS.items()
        if "CollectionService" in m and access is Access.ADMIN
    } == {
        "UpsertDocuments",
        "DeleteDocuments",
        "DeleteCollection",
    }
    assert access_of("/loraserve.v1.InferenceService/SomethingNew") is Access.ADMIN  # deny by default


@pytest.mark.parametrize(
    "peer", ["ipv4:10.1.2.3:5000", "ipv6:[2001:db8::7]:5000", "ipv6:%5B2001:db8::7%5D:5000", "unix:/tmp/socket"]
)
def test_a_remote_admin_call_needs_admin_tokens(monkeypatch, peer) -> None:
    access = interceptor(monkeypatch)
    denial = access.check(LIST_ADAPTERS, {}, peer)
    assert denial is not None and denial.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-tokens-file" in denial.message and "LORASERVE_ADMIN_TOKENS" in denial.message
    assert access.check(TOKENIZE, {}, peer) is None  # with no tokens, reading stays open
    assert access.check("/loraserve.v1.CollectionService/DeleteCollection", {}, peer) is not None


@pytest.mark.parametrize(
    "peer",
    ["ipv4:127.0.0.1:5000", "ipv4:127.9.8.7:1", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000", "ipv6:[::ffff:127.0.0.1]:1"],
)
def test_a_loopback_admin_call_needs_no_admin_token_when_there_are_none(monkeypatch, peer) -> None:
    assert interceptor(monkeypatch).check(LIST_ADAPTERS, {}, peer) is None
    with_tokens = interceptor(monkeypatch, admin="admin-token")  # once there are admin tokens, loopback needs one too
    assert with_tokens.check(LIST_ADAPTERS, bearer("admin-token"), peer) is None
    denial = with_tokens.check(LIST_ADAPTERS, bearer("admin-token-2"), peer)
    assert denial is not None and denial.code == grpc.StatusCode.UNAUTHENTICATED


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


def test_the_interceptor_guards_admin_calls_on_a_server_with_no_tokens_and_no_limit(monkeypatch) -> None:
    access = interceptor(monkeypatch)
    assert not access.active  # nothing to check for reading: reads pass untouched
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "done")

    def details(method: str) -> grpc.HandlerCallDetails:
        return type("Details", (), {"method": method, "invocation_metadata": ()})()

    assert access.intercept_service(lambda _: handler, details(TOKENIZE)) is handler
    for method in (LIST_ADAPTERS, "/loraserve.v1.InferenceService/SomethingNew"):
        guarded = access.intercept_service(lambda _: handler, details(method))
        remote = FakeContext("ipv4:192.0.2.1:4000")
        with pytest.raises(Aborted, match="--admin-tokens-file"):
            guarded.unary_unary("request", remote)
        assert remote.code == grpc.StatusCode.PERMISSION_DENIED
        assert guarded.unary_unary("request", FakeContext("ipv4:127.0.0.1:4000")) == "done"


def test_tokens_are_compared_as_fixed_length_digests(monkeypatch) -> None:
    access = interceptor(monkeypatch, auth="a-rather-long-user-token", admin="adm")
    lengths: list[tuple[int, int]] = []
    compare = interceptors.hmac.compare_digest

    def recorded(a, b) -> bool:  # type: ignore[no-untyped-def]
        lengths.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(interceptors.hmac, "compare_digest", recorded)
    for token in ("x", "a-rather-long-user-token", "adm", "y" * 500):
        access.check(LIST_ADAPTERS, bearer(token), "ipv4:127.0.0.1:1")
    assert lengths and set(lengths) == {(32, 32)}  # the same work whatever the token's length


def test_a_made_up_token_is_no_way_around_the_rate_limit(monkeypatch) -> None:
    access = interceptor(monkeypatch, rate_limit=0.001, rate_burst=1)  # no authentication
    assert access.check(TOKENIZE, bearer("made-up-1"), "ipv4:192.0.2.1:1000") is None
    denial = access.check(TOKENIZE, bearer("made-up-2"), "ipv4:192.0.2.1:1001")
    assert denial is not None and denial.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert access.check(TOKENIZE, bearer("made-up-3"), "ipv4:192.0.2.2:1000") is None  # another address


def test_authenticated_tokens_have_their_own_buckets(monkeypatch) -> None:
    access = interceptor(monkeypatch, auth="a,b", rate_limit=0.001, rate_burst=1)
    assert access.check(TOKENIZE, bearer("a"), "ipv4:192.0.2.1:1000") is None
    assert access.check(TOKENIZE, bearer("b"), "ipv4:192.0.2.1:1000") is None
    assert access.check(TOKENIZE, bearer("a"), "ipv4:192.0.2.9:1000") is not None  # the token's, wherever from


@pytest.mark.parametrize(
    ("peers", "shared"),
    [
        (["ipv4:192.0.2.1:1000", "192.0.2.1"], True),  # gRPC's peer and the HTTP API's client: one client
        (["ipv6:[2001:db8::1]:1000", "2001:db8::1"], True),
        (["ipv6:%5B2001:db8::1%5D:1000", "ipv6:[2001:db8::1]:2000"], True),
        (["ipv6:[::ffff:192.0.2.1]:1000", "ipv4:192.0.2.1:1000"], True),
        (["ipv6:[2001:db8::1]:1000", "ipv6:[2001:db8::ffff:2]:1000"], True),  # one /64: one client
        (["ipv6:[2001:db8::1]:1000", "ipv6:[2001:db8:0:1::1]:1000"], False),
        (["ipv4:192.0.2.1:1000", "ipv4:192.0.2.2:1000"], False),
    ],
)
def test_clients_are_keyed_by_address_the_same_way_for_both_protocols(monkeypatch, peers, shared) -> None:
    access = interceptor(monkeypatch, rate_limit=0.001, rate_burst=1)
    assert access.check(TOKENIZE, {}, peers[0]) is None
    assert (access.check(TOKENIZE, {}, peers[1]) is not None) == shared


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_new_clients_resets_nobodys_bucket_and_locks_nobody_out() -> None:
    clock = Clock()
    limiter = TokenBucket(rate=1.0, burst=2, capacity=3, clock=clock)
    assert limiter.take("victim") is None and limiter.take("victim") is None
    assert limiter.take("victim") is not None  # its burst is spent
    for n in range(100):  # a flood of distinct clients: each starts with no burst, so none gains anything
        refused = limiter.take(f"flood-{n}")
        if n >= 2:  # from the third on, the table is full of buckets that have not refilled
            assert refused is not None and refused.crowded and refused.wait_s == 1.0
    throttled = limiter.take("victim")  # forgotten meanwhile: it comes back with no burst, as badly off as before
    assert throttled is not None and throttled.wait_s == 1.0
    clock.now += 1.0
    assert limiter.take("victim") is None  # one token a second, never a reset burst
    assert limiter.take("victim") is not None
    assert limiter.take("newcomer") is not None  # a newcomer during the flood waits a token's time ...
    clock.now += 1.0
    assert limiter.take("newcomer") is None  # ... and is served, not locked out for as long as the flood lasts


def test_without_a_flood_new_clients_start_with_their_burst(monkeypatch) -> None:
    monkeypatch.setattr(interceptors, "MAX_CLIENTS_TRACKED", 2)
    access = interceptor(monkeypatch, rate_limit=1.0, rate_burst=5)
    assert access.check(TOKENIZE, {}, "ipv4:192.0.2.1:1") is None
    burst = [access.check(TOKENIZE, {}, "ipv4:192.0.2.2:1") for _ in range(5)]
    assert burst == [None] * 5  # a new client, no flood: its whole burst
    denial = access.check(TOKENIZE, {}, "ipv4:192.0.2.3:1")  # the table is full of buckets that hold a debt
    assert denial is not None and denial.code == grpc.StatusCode.RESOURCE_EXHAUSTED and denial.retry_after_s > 0
    assert "many clients" in denial.message and "retry in" in denial.message


def test_one_address_has_one_bucket_across_grpc_and_http(start_server, free_port, monkeypatch) -> None:
    import httpx

    monkeypatch.delenv("LORASERVE_AUTH_TOKENS", raising=False)
    monkeypatch.delenv("LORASERVE_ADMIN_TOKENS", raising=False)
    running = start_server(
        server_options={"http_port": free_port(), "rate_limit": 0.01, "rate_burst": 2}  # a token per 100 s
    )
    models = f"http://127.0.0.1:{running.server.http_port}/v1/models"
    assert running.client.tokenize("one").token_count  # no token: keyed by address, 127.0.0.1 for both
    assert httpx.get(models, timeout=HANG_GUARD_S).status_code == 200
    with pytest.raises(LoraserveRpcError) as error:
        running.client.tokenize("three")
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    limited = httpx.get(models, timeout=HANG_GUARD_S)
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"


def test_no_response_names_a_path_on_the_server(start_server, tiny_model_config, adapter_dirs, tmp_path, free_port):  # type: ignore[no-untyped-def]
    """ModelInfo, ListAdapters, LoadAdapter (and its errors) and /v1/models name models and adapters by what the
    caller may know: an S3 location, the folder name given under --adapter-root, or a folder's own name."""
    root = tmp_path / "adapter-root"
    shutil.copytree(adapter_dirs["beta"], root / "team" / "beta")
    model_config = replace(tiny_model_config, adapter_root=str(root))
    running = start_server(model_config=model_config, server_options={"http_port": free_port()})
    loaded = running.client.load_adapter("gamma", "team/beta")
    with pytest.raises(LoraserveRpcError) as missing:
        running.client.load_adapter("delta", "team")  # a folder without an adapter in it
    models = httpx.get(f"http://127.0.0.1:{running.server.http_port}/v1/models", timeout=HANG_GUARD_S).text
    answers = [repr(running.client.model_info()), repr(running.client.list_adapters()), repr(loaded), models]
    answers.append(missing.value.details)
    server_paths = [str(root), str(tmp_path), model_config.model, *(str(p) for p in adapter_dirs.values())]
    for answer in answers:
        assert not [path for path in server_paths if path in answer], answer
    assert loaded.adapter.source == "team/beta" and "no adapter_config.json" in missing.value.details
    info = running.client.model_info()
    assert {a.id: a.source for a in info.adapters}["alpha"] == Path(adapter_dirs["alpha"]).name
    assert info.model_source == Path(model_config.model).name


def test_a_second_server_on_a_port_in_use_refuses_to_start(start_server, tiny_server) -> None:
    """grpc's default SO_REUSEPORT would let it start and split the connections between the two processes: a
    client's answer would then depend on which one it reached (a choice constraint 'ignored' on some fresh starts
    was another server on the same port answering)."""
    with pytest.raises(ConfigError, match=f"--port {tiny_server.port}: cannot listen"):
        start_server(server_options={"port": tiny_server.port}, load=False)
    assert tiny_server.client.health() == "SERVING"
