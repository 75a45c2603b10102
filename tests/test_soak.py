"""A short soak (bench/soak.py, bounded in requests and time) against a `loraserve serve` process on the tiny model:
two identical rounds of mixed traffic, where every call must end with the status its case expects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEVER = {"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNIMPLEMENTED"}


def test_mixed_traffic_ends_every_call_as_expected_and_leaves_the_server_idle(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = ["--requests", "3000", "--max-seconds", "30", "--clients", "8", "--max-new-tokens", "32"]
    options += ["--max-sequence-length", "256", "--kv-cache-memory", "64MB"]
    command = [sys.executable, "bench/soak.py", "--model", str(tiny_model_dir), *options, "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "soak-cpu.json").read_text())
    assert summary["failures"] == []
    for soak_round in summary["rounds"]:
        assert soak_round["unexpected_count"] == 0, soak_round["unexpected"]
        statuses = set(soak_round["statuses"])
        assert not statuses & NEVER
        # Every kind of ending the mix is built to produce did occur.
        assert {"OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"} <= statuses
        assert soak_round["idle_after"] == {"active_requests": 0, "queued_requests": 0, "kv_cache_used_blocks": 0}
        cases = soak_round["latency_s"]
        cases_run = ("generate", "stream", "stream_cancelled", "stream_deadline", "rag_query", "tokenize")
        hostile = ("edge_values", "no_deadline", "over_the_limit", "slow_reader", "constrained")
        for case in cases_run + hostile:
            assert cases[case]["calls"] > 0 and 0 < cases[case]["p50"] <= cases[case]["p99"]
        assert cases["load_adapter"]["calls"] > 0 and cases["unload_adapter"]["calls"] > 0
        assert soak_round["health_probes"] > 0 and soak_round["not_serving_probes"] == 0
    assert summary["rss_growth"] <= 0.05
    assert "p99 ms" in result.stdout and "flags:" in result.stdout
