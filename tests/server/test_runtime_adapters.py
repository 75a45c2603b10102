"""AdapterService while the server runs: loading from the adapter root and from S3, the id and source rules, LRU
eviction, unloading under traffic, and the S3 failure modes; plus the Ready RPC and serving a model from S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from loraserve.client import LoraserveRpcError
from loraserve.config import ModelConfig
from loraserve.errors import InvalidRequest, PermissionDenied
from loraserve.server.models.adapters.sources import resolve_source
from loraserve.storage import S3Location, push, s3_client, write_manifest
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S, EngineGate, wait_for


def admin(target: str) -> pb_grpc.AdapterServiceStub:
    return pb_grpc.AdapterServiceStub(grpc.insecure_channel(target))


def call(method, request, timeout: float = HANG_GUARD_S):  # type: ignore[no-untyped-def]
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise LoraserveRpcError(error.code(), error.details() or "") from None


def tokens(client, adapter: str) -> list[int]:  # type: ignore[no-untyped-def]
    result = client.generate("Once upon a time", adapter_id=adapter, max_new_tokens=8, min_new_tokens=8, token_ids=True)
    return [t.id for t in result.tokens]


@pytest.fixture
def root_server(start_server, tiny_model_config: ModelConfig, adapter_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    """A server whose adapter root holds the test adapters; alpha is loaded at start, at most 2 resident."""
    root = adapter_dirs["alpha"].parent
    config = replace(tiny_model_config, adapter=(f"alpha={adapter_dirs['alpha']}",), adapter_root=str(root))
    return start_server(model_config=config, max_adapters=2, kv_cache_memory="64MB")


def test_an_adapter_loaded_at_runtime_serves_like_one_loaded_at_start(root_server, tiny_server, adapter_dirs) -> None:
    stub = admin(root_server.target)
    response = call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="b2", source=adapter_dirs["beta"].name))
    assert response.adapter.id == "b2" and response.adapter.rank == 8 and not response.evicted
    assert tokens(root_server.client, "b2") == tokens(tiny_server.client, "beta")
    listed = call(stub.ListAdapters, pb.ListAdaptersRequest())
    assert [a.id for a in listed.adapters] == ["b2", "alpha"] and listed.max_adapters == 2
    assert {a.id for a in root_server.client.model_info().adapters} == {"b2", "alpha"}


@pytest.mark.parametrize(
    ("adapter_id", "source", "code", "fragment"),
    [
        ("alpha", "adapter-beta0", grpc.StatusCode.ALREADY_EXISTS, "already loaded"),
        ("x", "../../etc", grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root"),
        ("x", "/etc", grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root"),
        ("x", "no-such-adapter", grpc.StatusCode.NOT_FOUND, "no adapter folder"),
        ("x", "s3://other-bucket/adapters/x", grpc.StatusCode.PERMISSION_DENIED, "not in an allowed bucket"),
        ("../x", "adapter-beta0", grpc.StatusCode.INVALID_ARGUMENT, "not a valid adapter id"),
        ("x", "", grpc.StatusCode.INVALID_ARGUMENT, "source: must name"),
        ("x", "tokenizer0", grpc.StatusCode.INVALID_ARGUMENT, "no adapter_config.json"),
        ("x", "0" * 5000, grpc.StatusCode.INVALID_ARGUMENT, "not a usable folder name"),  # found by test_fuzz
        ("x", "a\x00b", grpc.StatusCode.INVALID_ARGUMENT, "not a usable folder name"),
    ],
)
def test_bad_loads_get_their_status_and_change_nothing(root_server, adapter_id, source, code, fragment) -> None:
    with pytest.raises(LoraserveRpcError) as error:
        call(admin(root_server.target).LoadAdapter, pb.LoadAdapterRequest(adapter_id=adapter_id, source=source))
    assert error.value.code == code and fragment in error.value.details
    assert [a.id for a in root_server.client.model_info().adapters] == ["alpha"]
    assert root_server.client.health() == "SERVING"


def test_without_an_adapter_root_local_loads_are_refused(tiny_server) -> None:
    with pytest.raises(LoraserveRpcError) as error:
        call(admin(tiny_server.target).LoadAdapter, pb.LoadAdapterRequest(adapter_id="x", source="anything"))
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED and "no --adapter-root" in error.value.details


def test_the_least_recently_used_idle_adapter_makes_room(root_server, adapter_dirs) -> None:
    stub = admin(root_server.target)
    call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="b2", source=adapter_dirs["beta"].name))
    tokens(root_server.client, "alpha")  # alpha is now the most recently used
    response = call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="a2", source=adapter_dirs["alpha"].name))
    assert list(response.evicted) == ["b2"]
    with pytest.raises(LoraserveRpcError) as error:
        tokens(root_server.client, "b2")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert tokens(root_server.client, "a2") == tokens(root_server.client, "alpha")


def test_when_every_resident_adapter_is_busy_a_load_is_refused(root_server, adapter_dirs, monkeypatch) -> None:
    stub = admin(root_server.target)
    call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="b2", source=adapter_dirs["beta"].name))
    engine = root_server.server.engine
    with ThreadPoolExecutor(2) as readers, EngineGate(engine, monkeypatch) as gate:
        # The engine steps only when an adapter change waits for it (it applies changes between steps): the two
        # requests stay in use until the test lets them finish, however slow the machine.
        gate.hold_when(lambda: not engine.adapters.has_pending())
        streams = [
            readers.submit(list, root_server.client.stream("Hi", adapter_id=a, max_new_tokens=60, min_new_tokens=60))
            for a in ("alpha", "b2")
        ]

        def both_in_use() -> bool:
            return [a.active_requests for a in root_server.client.model_info().adapters] == [1, 1]

        wait_for(both_in_use, "both requests to start")
        with pytest.raises(LoraserveRpcError) as error:
            call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="c", source=adapter_dirs["alpha"].name))
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in use" in error.value.details
        gate.release()
        assert all(stream.result(HANG_GUARD_S)[-1].generated_token_count == 60 for stream in streams)


def test_unloading_waits_for_running_requests_and_refuses_new_ones(root_server, monkeypatch) -> None:
    with EngineGate(root_server.server.engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the running request cannot finish before the test lets it
        stream = root_server.client.stream("Hi", adapter_id="alpha", max_new_tokens=40, min_new_tokens=40)
        next(stream)
        done: list[object] = []
        request = pb.UnloadAdapterRequest(adapter_id="alpha")
        unloading = threading.Thread(target=lambda: done.append(call(admin(root_server.target).UnloadAdapter, request)))
        unloading.start()

        def unload_started() -> bool:  # alpha leaves the list then; from then on new requests are refused
            return "alpha" not in [a.id for a in root_server.client.model_info().adapters]

        wait_for(unload_started, "the unload to start")
        with pytest.raises(LoraserveRpcError) as error:
            tokens(root_server.client, "alpha")
        assert error.value.code == grpc.StatusCode.NOT_FOUND and "'alpha'" in error.value.details
        assert not done, "the unload must wait for the running request"
        gate.release()
        assert list(stream)[-1].generated_token_count == 40  # the running request finished undisturbed
    unloading.join(HANG_GUARD_S)
    assert not unloading.is_alive(), f"hang guard: the unload had not returned after {HANG_GUARD_S:.0f} s"
    assert done and done[0].adapter_id == "alpha"
    assert root_server.client.model_info().adapters == ()


def test_ready_follows_loading_and_draining(start_server) -> None:
    running = start_server(load=False)
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(running.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.Ready(pb.ReadyRequest(), timeout=HANG_GUARD_S)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    running.server.load()
    assert stub.Ready(pb.ReadyRequest(), timeout=HANG_GUARD_S) == pb.ReadyResponse()
    running.server.drain()
    with pytest.raises(grpc.RpcError) as error:
        stub.Ready(pb.ReadyRequest(), timeout=HANG_GUARD_S)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def s3_adapter(bucket: str, adapter_dirs: dict[str, Path], tmp_path: Path) -> str:
    """The beta adapter pushed to s3://bucket/adapters/beta (version v1)."""
    folder = tmp_path / "beta"
    shutil.copytree(adapter_dirs["beta"], folder)
    write_manifest(folder, "adapter")
    push(folder, S3Location(bucket, "adapters/beta"), "v1")
    return f"s3://{bucket}/adapters/beta"


def test_adapters_load_from_an_allowed_bucket_once_per_version(
    start_server, tiny_model_config, tiny_server, bucket, s3_adapter, tmp_path
) -> None:
    config = replace(
        tiny_model_config, adapter=(), adapter_buckets=(f"{bucket}/adapters",), model_cache=str(tmp_path / "cache")
    )
    running = start_server(model_config=config)
    stub = admin(running.target)
    response = call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="beta", source=s3_adapter))
    assert response.adapter.version == "v1"
    assert tokens(running.client, "beta") == tokens(tiny_server.client, "beta")
    cached = tmp_path / "cache" / "s3" / bucket / "adapters" / "beta" / "v1"
    assert (cached / "manifest.json").is_file()
    # A cached, verified version is not downloaded again: it loads even with the objects gone.
    for item in s3_client().list_objects_v2(Bucket=bucket, Prefix="adapters/beta/v1/")["Contents"]:
        s3_client().delete_object(Bucket=bucket, Key=item["Key"])
    call(stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id="beta"))
    call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="beta", source=s3_adapter, version="v1"))


def test_a_corrupted_s3_adapter_is_refused_and_the_server_keeps_serving(
    start_server, tiny_model_config, bucket, s3_adapter, tmp_path
) -> None:
    s3_client().put_object(Bucket=bucket, Key="adapters/beta/v1/adapter_model.safetensors", Body=b"tampered")
    config = replace(tiny_model_config, adapter_buckets=(bucket,), model_cache=str(tmp_path / "cache"))
    running = start_server(model_config=config)
    with pytest.raises(LoraserveRpcError) as error:
        call(admin(running.target).LoadAdapter, pb.LoadAdapterRequest(adapter_id="beta2", source=s3_adapter))
    assert error.value.code == grpc.StatusCode.DATA_LOSS and "corrupted" in error.value.details
    beta_cache = tmp_path / "cache" / "s3" / bucket / "adapters" / "beta"
    assert not beta_cache.exists() or not any(beta_cache.iterdir())  # nothing half-written left behind
    assert running.client.health() == "SERVING" and tokens(running.client, "alpha")


def test_an_unreachable_s3_endpoint_is_retried_then_reported(
    start_server, tiny_model_config, tmp_path, monkeypatch, free_port
) -> None:
    closed = free_port()  # no server of this run will listen there
    for name, value in {
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "LORASERVE_S3_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    config = replace(tiny_model_config, adapter_buckets=("b",), model_cache=str(tmp_path / "cache"))
    running = start_server(model_config=config)
    with pytest.raises(LoraserveRpcError) as error:
        call(admin(running.target).LoadAdapter, pb.LoadAdapterRequest(adapter_id="x", source="s3://b/x"))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "unreachable" in error.value.details
    assert running.client.health() == "SERVING"


def test_the_model_itself_can_come_from_s3(start_server, tiny_model_dir, bucket, tmp_path, tiny_server) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    model_push = [sys.executable, "-m", "loraserve.cli", "model", "push"]
    location = f"s3://{bucket}/models/tiny"
    pushed = subprocess.run(
        [*model_push, str(folder), location, "--version", "2026-11-27"], capture_output=True, text=True, timeout=120
    )
    assert pushed.returncode == 0 and pushed.stdout.strip() == "2026-11-27", pushed.stderr
    assert (folder / "manifest.json").is_file()
    refused = subprocess.run([*model_push, str(tmp_path), location], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "has no config.json" in refused.stderr
    config = ModelConfig(
        model=f"s3://{bucket}/models/tiny", model_cache=str(tmp_path / "cache"), device="cpu", max_sequence_length=256
    )
    running = start_server(model_config=config)
    info = running.client.model_info()
    assert info.model_name == "tiny@2026-11-27" and info.model_source == f"s3://{bucket}/models/tiny"
    assert tokens(running.client, "") == tokens(tiny_server.client, "")


@pytest.mark.parametrize(
    ("source", "entries", "error"),
    [
        ("s3://bkt/allowed/../other", ("bkt/allowed",), InvalidRequest),  # S3 or a proxy may normalise the ..
        ("s3://bkt/allowed/./x", ("bkt/allowed",), InvalidRequest),
        ("s3://bkt/allowedXYZ/x", ("bkt/allowed",), PermissionDenied),
        ("s3://bkt/other", ("bkt/allowed",), PermissionDenied),
        ("s3://bkt2/allowed/x", ("bkt/allowed",), PermissionDenied),
        ("s3://bk/t/allowed", ("bkt/allowed",), PermissionDenied),
        ("s3://bkt/allowed/x", ("bkt/../bkt/allowed",), PermissionDenied),  # an entry that names no safe prefix
        ("s3://bkt/allowed", ("bkt/allowed/",), None),
        ("s3://bkt/allowed/team/x", ("other", "bkt/allowed"), None),
        ("s3://bkt/anything/at/all", ("bkt",), None),
    ],
)
def test_s3_sources_are_matched_segment_by_segment(source: str, entries: tuple[str, ...], error: type | None) -> None:
    if error is None:
        assert resolve_source("x", source, "", entries).path == source
        return
    with pytest.raises(error, match="source"):
        resolve_source("x", source, "", entries)


def test_a_crafted_version_is_refused_before_it_becomes_a_path(
    start_server, tiny_model_config, bucket, s3_adapter, adapter_dirs, tmp_path
) -> None:
    planted = tmp_path / "planted"  # an adapter folder with a manifest, outside the cache: not S3's to serve
    shutil.copytree(adapter_dirs["alpha"], planted)
    write_manifest(planted, "adapter")
    config = replace(tiny_model_config, adapter_buckets=(bucket,), model_cache=str(tmp_path / "cache"))
    running = start_server(model_config=config)
    stub = admin(running.target)
    call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="beta2", source=s3_adapter, version="v1"))
    for version in ("../../../../../planted", "..", "v1/../v1", ".v1.lock", "v" * 129):
        with pytest.raises(LoraserveRpcError) as error:
            call(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="x", source=s3_adapter, version=version))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.details.startswith("version: ")
    assert {a.id for a in running.client.model_info().adapters} == {"alpha", "beta", "beta2"}


def test_adapter_config_patterns_are_checked_as_the_adapter_is_read(
    start_server, tiny_model_config, adapter_dirs, tmp_path
) -> None:
    cases = {
        "not-a-regex": {"alpha_pattern": {"(": 8}},
        "not-a-number": {"alpha_pattern": {"q_proj": "big"}},
        "backtracking": {"alpha_pattern": {"(a+)+$": 8}},
        "bad-rank": {"rank_pattern": {"q_proj": "four"}},
    }
    for name, changes in cases.items():
        folder = tmp_path / "root" / name
        shutil.copytree(adapter_dirs["alpha"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | changes))
    running = start_server(model_config=replace(tiny_model_config, adapter=(), adapter_root=str(tmp_path / "root")))
    for name, changes in cases.items():
        with pytest.raises(LoraserveRpcError) as error:
            call(admin(running.target).LoadAdapter, pb.LoadAdapterRequest(adapter_id=name, source=name))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and next(iter(changes)) in error.value.details
    assert running.client.model_info().adapters == () and running.client.health() == "SERVING"
