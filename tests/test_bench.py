"""The benchmark scripts keep working: each runs end to end on a tiny model and writes its figures. (They measure
nothing here; the figures in docs/ and bench/results/ come from full runs.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_KV = "64MB"  # the tiny model's servers need little cache; the automatic size would take 2 GiB each


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_throughput_script_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run(
        "bench/throughput.py",
        "--model",
        str(tiny_model_dir),
        "--levels",
        "1",
        "3",
        "--new-tokens",
        "4",
        "--prompt-tokens",
        "16",
        "--requests-per-stream",
        "1",
        "--sequential-requests",
        "1",
        "--adapters",
        "2",
        "--adapter-rank",
        "4",
        "--shared-prefix-tokens",
        "48",
        "--kv-cache-memory",
        TINY_KV,
        "--no-peer",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "throughput-cpu.json").read_text())
    names = {(r["name"], r["concurrency"]) for r in summary["results"]}
    assert names >= {
        ("server", 1),
        ("server", 3),
        ("server, 2 adapters mixed", 3),
        ("hf sequential", 1),
        ("hf static batch", 3),
        ("server, shared prefix, cached", 16),
        ("server, shared prefix, no cache", 16),
    }
    assert any(name.startswith("server, Poisson") for name, _ in names)
    ratios = summary["ratios"]
    assert {"server_3_vs_hf_static_3", "server_1_vs_hf_generate", "mixed_adapters_vs_base"} <= set(ratios)
    assert ratios["matmul_peak_gflops"] > 0 and 0 < ratios["server_3_peak_fraction"] < 1
    assert ratios["shared_prefix_outputs_identical"] == 1.0 and ratios["shared_prefix_ttft_speedup"] > 0
    assert {"poisson_ttft_p50_s", "poisson_itl_p95_over_p50"} <= set(ratios)
    server = [r for r in summary["results"] if r["name"] == "server"]
    assert all(r["generated_tokens"] == r["requests"] * 4 and r["mean_input_tokens"] > 0 for r in server)
    assert (
        summary["machine"]["cpu_cores"]
        and "cpu_flags" in summary["machine"]
        and (tmp_path / "throughput-cpu.png").stat().st_size > 0
    )


def test_gpu_script_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    result = run("bench/gpu.py", "--tiny", "--streams", "4", "--new-tokens", "8", "--rank", "4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    for key in (
        "batch1_tok_s",
        "batch1_lora_tok_s",
        "streams4_tok_s",
        "streams4_4_adapters_tok_s",
        "lora_cost_batch1",
        "lora_cost_mixed",
        "hf_batch1_tok_s",
        "roofline_batch1_tok_s",
    ):
        assert key in figures
    assert figures["batch1_tok_s"] > 0 and figures["streams4_tok_s"] > 0


def test_training_gpu_script_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    result = run("bench/train_gpu.py", "--tiny", "--steps", "2", "--length", "32", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "train-gpu-tiny-cpu.json").read_text())
    assert figures["lora"]["tokens_per_s"] > 0 and figures["qlora"].startswith("skipped")


def test_retrieval_script_meets_the_quality_bar_on_the_labelled_set(tmp_path: Path) -> None:
    result = run("bench/retrieval.py", "--passages", "400", "--repeats", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "retrieval-cpu.json").read_text())
    labelled = summary["labelled_set"]
    assert labelled["questions"] >= 50 and labelled["passages"] >= 200 and labelled["unanswerable_questions"] > 0
    quality = labelled["quality"]
    assert quality["hybrid"]["recall@3"] >= 0.9  # the bar the retrieval is held to
    assert {"bm25", "dense", "hybrid", "rrf"} <= set(quality) and all(0 < q["mrr"] <= 1 for q in quality.values())
    default = [t for t in labelled["threshold_sweep"] if t["min_similarity"] == labelled["default_min_similarity"]]
    assert default and default[0]["answerable_with_answer_in_top3"] >= 0.9
    assert summary["collection"]["passages"] == 400 and summary["collection"]["query_ms_p50"] > 0
    embedders = summary["embedders"]
    assert set(embedders["passages_per_second"]) == {"transformers (server)", "sentence-transformers"}
    assert embedders["max_abs_difference"] < 1e-4  # the server's embeddings are sentence-transformers' embeddings


def tiny_run(script: str, model: Path, out: Path, summary: str, *options: str) -> dict:
    """Run a benchmark script on the tiny model with short settings; its JSON summary."""
    result = run(
        script,
        *("--model", str(model), "--kv-cache-memory", TINY_KV),
        *("--new-tokens", "4", "--prompt-tokens", "16", "--out", str(out), *options),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / summary).read_text())


def test_structured_script_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    options = ("--repeats", "1", "--mask-steps", "4", "--schemas", "4")
    summary = tiny_run("bench/structured.py", tiny_model_dir, tmp_path, "structured-cpu.json", *options)
    libraries = {row["library"]: row for row in summary["libraries"]}
    assert set(libraries) == {
        "llguidance, as loraserve applies it",
        "llguidance, masks only",
        "xgrammar, row by row",
        "xgrammar, batch matcher",
        "outlines-core, row by row",
    }
    assert all(row["mask_ms_per_step_batch_32"] > 0 for row in libraries.values())
    engine = summary["engine"]
    assert engine["json_vs_free"] > 0 and engine["mask_steps"] > 0 and engine["mask_ms_per_step"] > 0
    assert {r["generated_tokens"] for runs in engine["runs"].values() for r in runs} == {32 * 4}


def test_http_vs_grpc_script_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    options = ("--streams", "3", "--repeats", "1")
    summary = tiny_run("bench/http_vs_grpc.py", tiny_model_dir, tmp_path, "http-vs-grpc-cpu.json", *options)
    assert summary["http_vs_grpc"] > 0 and summary["http_ttft_p50_s"] > 0
    for name in ("grpc", "http"):
        (run_result,) = summary["runs"][name]
        assert run_result["generated_tokens"] == 3 * 4 and run_result["requests"] == 3


def test_revisions_script_runs_both_sides_alternating(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The working tree against HEAD, one round of a tiny throughput run each; the temporary worktree is removed."""
    out = tmp_path / "revisions.json"
    tiny = ["--model", str(tiny_model_dir), "--levels", "2", "--new-tokens", "4", "--prompt-tokens", "16"]
    tiny += ["--requests-per-stream", "1", "--sequential-requests", "1", "--adapters", "0", "--no-peer"]
    tiny += ["--shared-prefix-tokens", "0", "--kv-cache-memory", TINY_KV]
    result = run("bench/revisions.py", "--rounds", "1", "--out", str(out), "--", *tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu flags:" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["streams"] == 2 and len(row["base"]) == len(row["working_tree"]) == 1 and row["ratio_of_medians"] > 0
    worktrees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "loraserve-revisions-" not in worktrees.stdout


def test_schedule_simulation_shows_bursts_taking_fewer_steps() -> None:
    result = run("bench/schedule_sim.py", "--ratios", "0", "0.3", "--seeds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ratio 0.0", "ratio 0.3"]
    paced, burst = (int(line.split(" steps")[0].rsplit(" ", 1)[1]) for line in lines)
    # a burst of 32 prompts fed at full size starts its streams together: fewer, fuller steps for the same work
    assert burst < paced


def test_kernels_script_compares_both_paths_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    result = run(
        "bench/native_kernels.py",
        "--model",
        str(tiny_model_dir),
        "--rows",
        "1",
        "4",
        "--context",
        "40",
        "--steps",
        "3",
        "--prefill-tokens",
        "64",
        "--prefill-steps",
        "2",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu flags:" in result.stdout
    report = json.loads(out.read_text())
    assert [(r["rows"], r["context"]) for r in report["decode"]] == [(1, 40), (4, 40)]
    assert report["prefill"]["prefill_tokens"] == 64
    for row in [*report["decode"], report["prefill"]]:
        assert row["torch_ms"] > 0 and row["native_ms"] > 0
        assert row["max_logit_difference"] < 1e-3  # the two paths compute the same model
