"""Faults from outside: an S3 endpoint that drops connections mid-object or answers slowly (a proxy in front of moto
on 127.0.0.1), `loraserve adapters pull` killed with SIGKILL mid-download, a full disk under the adapter cache (a
tiny tmpfs in a private mount namespace), and a client that opens 500 streams and never reads them. In every case
the error is clear, the retries are bounded, nothing half-written is left, and the server keeps serving.

No assertion here is about time: retries are bounded by the attempts the proxy counts, timeouts by what they make
happen (a slow answer that would have succeeded fails instead), and every wait for an event is bounded only by
HANG_GUARD, far above how long it normally takes, so that a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from loraserve.client import Client, LoraserveRpcError
from loraserve.storage import S3Location, push, sha256_file, write_manifest
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S as HANG_GUARD
from tests.conftest import wait_for

LORASERVE = [sys.executable, "-m", "loraserve.cli"]
WEIGHTS = "adapter_model.safetensors"


def push_adapter(folder: Path, bucket: str, prefix: str, scratch: Path) -> str:
    copy = scratch / prefix.replace("/", "-")
    shutil.copytree(folder, copy)
    write_manifest(copy, "adapter")
    push(copy, S3Location(bucket, prefix), "v1")
    return f"s3://{bucket}/{prefix}"


def partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*partial*")) if folder.is_dir() else []


def pull(location: str, destination: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = [*LORASERVE, "adapters", "pull", location, str(destination)]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD, env=os.environ | env)


def test_a_pull_killed_mid_download_leaves_no_folder_and_the_next_pull_completes(
    faulty_s3, bucket: str, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    location = push_adapter(adapter_dirs["beta"], bucket, "adapters/beta", tmp_path)
    faulty_s3.misbehave("slow", WEIGHTS, delay=HANG_GUARD)  # the weights never come before the kill
    destination = tmp_path / "pulled" / "beta"
    process = subprocess.Popen(
        [*LORASERVE, "adapters", "pull", location, str(destination)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: faulty_s3.hits >= 1 and partials(destination.parent), "the pull to ask for the weights")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert not destination.exists() and partials(destination.parent)  # only the dead process's staging folder
    faulty_s3.misbehave("pass", "")
    result = pull(location, destination)
    assert result.returncode == 0, result.stderr
    assert {p.name: sha256_file(p) for p in destination.iterdir() if p.name != "manifest.json"} == {
        p.name: sha256_file(p) for p in adapter_dirs["beta"].iterdir()
    }
    assert partials(destination.parent) == []  # the next pull removed what the killed one left


def test_a_connection_dropped_mid_object_is_retried_a_bounded_number_of_times(
    faulty_s3, bucket: str, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    location = push_adapter(adapter_dirs["beta"], bucket, "adapters/beta", tmp_path)
    destination = tmp_path / "pulled" / "beta"
    faulty_s3.misbehave("drop", WEIGHTS, drop_after=700)
    failed = pull(location, destination, LORASERVE_S3_MAX_ATTEMPTS="3")
    assert failed.returncode == 1
    assert f"downloading {location}/v1/{WEIGHTS}: S3 unreachable after 3 attempts" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert 2 <= faulty_s3.hits <= 9  # retried, and at most attempts x attempts (botocore's inside s3transfer's)
    assert not destination.exists() and partials(destination.parent) == []

    faulty_s3.misbehave("drop", WEIGHTS, drop_after=700, times=1)  # one dropped connection, then a healthy one
    recovered = pull(location, destination, LORASERVE_S3_MAX_ATTEMPTS="3")
    assert recovered.returncode == 0, recovered.stderr
    assert faulty_s3.hits == 1
    assert sha256_file(destination / WEIGHTS) == sha256_file(adapter_dirs["beta"] / WEIGHTS)


def test_the_server_reports_a_failing_s3_as_unavailable_caches_nothing_and_keeps_serving(
    start_server, tiny_model_config, faulty_s3, bucket: str, adapter_dirs, tmp_path: Path, monkeypatch
) -> None:
    location = push_adapter(adapter_dirs["beta"], bucket, "adapters/beta", tmp_path)
    monkeypatch.setenv("LORASERVE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("LORASERVE_S3_READ_TIMEOUT", "0.5")
    cache = tmp_path / "cache"
    running = start_server(model_config=replace(tiny_model_config, adapter_buckets=(bucket,), model_cache=str(cache)))
    admin = pb_grpc.AdapterServiceStub(grpc.insecure_channel(running.target))
    cached = cache / "s3" / bucket / "adapters" / "beta"
    for fault in ("drop", "slow"):
        # "slow" holds the weights back ten times the read timeout and then sends them: the load fails only because
        # the timeout ends each attempt. "drop" breaks every download of them mid-object.
        faulty_s3.misbehave(fault, WEIGHTS, drop_after=700, delay=5.0)
        with pytest.raises(grpc.RpcError) as error:
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="beta-s3", source=location), timeout=HANG_GUARD)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (fault, error.value.details())
        assert "S3 unreachable after 2 attempts" in error.value.details()
        # Retried, and bounded: at most 2 x 2 GETs of the weights (botocore's attempts inside s3transfer's).
        assert 2 <= faulty_s3.hits <= 4, (fault, faulty_s3.hits)
        assert not (cached / "v1").exists() and partials(cached) == []
        assert running.client.health() == "SERVING"
        assert running.client.generate("Still here?", max_new_tokens=2, adapter_id="alpha").generated_token_count == 2
    faulty_s3.misbehave("pass", "")
    loaded = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="beta-s3", source=location), timeout=HANG_GUARD)
    assert loaded.adapter.version == "v1" and (cached / "v1" / "manifest.json").is_file()


def big_adapter(tiny_model_dir: Path, out: Path) -> Path:
    """A rank-256 adapter on every projection of the tiny model: about 2 MB of weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=256, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(out)
    return out


def test_a_full_adapter_cache_disk_is_a_clear_error_and_the_server_keeps_what_it_has(
    tiny_model_dir: Path, adapter_dirs, bucket: str, tmp_path: Path, free_port, wait_for_health
) -> None:
    small = push_adapter(adapter_dirs["beta"], bucket, "adapters/small", tmp_path)
    big = push_adapter(big_adapter(tiny_model_dir, tmp_path / "big-src"), bucket, "adapters/big", tmp_path)
    cache, port = tmp_path / "cache", free_port()
    cache.mkdir()
    serve = [*LORASERVE, "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory", "64MB"]
    serve += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--rag-store", str(tmp_path / "rag")]
    serve += ["--model-cache", str(cache), "--adapter-buckets", bucket]
    # The cache is a 512 KiB tmpfs, mounted in a mount namespace of the server's own (no root needed).
    mount = 'mount -t tmpfs -o size=512k loraserve-cache "$0" && exec "$@"'
    process = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(cache), *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=HANG_GUARD) as client:
            wait_for_health(client, "SERVING", process)
            seen = Path(f"/proc/{process.pid}/root") / cache.relative_to("/")  # the tmpfs, as the server sees it
            admin = pb_grpc.AdapterServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="small", source=small), timeout=HANG_GUARD)
            with pytest.raises(grpc.RpcError) as error:
                admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="big", source=big), timeout=HANG_GUARD)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no space left on the local disk" in error.value.details()
            big_cache = seen / "s3" / bucket / "adapters" / "big"
            assert not (big_cache / "v1").exists() and partials(big_cache) == []
            assert (seen / "s3" / bucket / "adapters" / "small" / "v1" / "manifest.json").is_file()
            assert client.health() == "SERVING"
            assert client.generate("Ahoy?", adapter_id="small", max_new_tokens=3).generated_token_count == 3
            assert [a.id for a in client.list_adapters().adapters] == ["small"]
    finally:
        process.kill()
        process.wait(timeout=30)


def rss_bytes(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_500_unread_streams_stay_bounded_other_clients_are_served_and_the_streams_end_at_their_deadline(
    tiny_model_dir: Path, tmp_path: Path, free_port, wait_for_health
) -> None:
    port = free_port()
    serve = [*LORASERVE, "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory", "64MB"]
    serve += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--rag-store", str(tmp_path)]
    serve += ["--max-batch-size", "4", "--max-queued-requests", "4", "--max-top-n", "256"]
    process = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Each streamed token carries its 256 alternatives (~5 KB): 40 tokens overflow a stream's 64 KiB window, and the
    # engine makes them in a moment.
    request = pb.GenerateStreamRequest(
        prompt="Tell me a long story.",
        stopping=pb.StoppingCriteria(max_new_tokens=40, min_new_tokens=40),
        response=pb.ResponseOptions(logprobs=True, top_n=256),
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=HANG_GUARD) as other:
            wait_for_health(other, "SERVING", process)
            other.generate("Warm up.", max_new_tokens=2)
            before = rss_bytes(process.pid)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                # Never read, and open until the test cancels them: their deadline is only a hang guard.
                calls = [stub.GenerateStream(request, timeout=HANG_GUARD) for _ in range(500)]
                # The engine finishes the admitted requests at its own pace; their unread output waits in the
                # transport (flow control), not in the engine.
                wait_for(lambda: idle(other), "the engine to finish the admitted streams while nobody reads them")
                during = rss_bytes(process.pid)
                assert other.health() == "SERVING"
                assert other.generate("Are you there?", max_new_tokens=4).generated_token_count == 4
                held = [call for call in calls if not call.done()]
                assert held  # the other client was served while these streams were open and unread
                assert {call.code() for call in calls if call not in held} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
                for call in held:
                    call.cancel()
                assert {call.code() for call in held} == {grpc.StatusCode.CANCELLED}
            assert during - before < 200 * 2**20  # bounded: no stream's output piles up without limit
            wait_for(lambda: idle(other), "the engine to be idle once the streams are cancelled")
            # A deadline ends a stream nobody reads: as many as the engine admits at once (batch + queue), each
            # with a deadline. None can finish (its output overflows the window), so each ends at that deadline.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                expiring = [stub.GenerateStream(request, timeout=2) for _ in range(8)]
                codes = [call.code() for call in expiring]  # each waits for its call's end
            assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
            assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            wait_for(lambda: idle(other), "the engine to be idle after the deadlines")
            assert other.generate("And now?", max_new_tokens=4).generated_token_count == 4
    finally:
        process.kill()
        process.wait(timeout=30)


def idle(client: Client) -> bool:
    """Whether the engine has nothing running, queued or held; False while the server refuses calls over its RPC
    limit (RESOURCE_EXHAUSTED, retryable), which happens only while a burst of new calls arrives."""
    try:
        stats = client.model_info().stats
    except LoraserveRpcError as error:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
    return (stats["active_requests"], stats["queued_requests"], stats["kv_cache_used_blocks"]) == (0, 0, 0)
