"""The run's report: report.md (data summary, configuration, metrics, sample answers before and after training, the
reload check) and loss_curve.png."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraserve.trainer.checkpoints import RunState
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.validation import Report


def plot_losses(state: RunState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    if state.train_losses:
        steps, losses = zip(*state.train_losses, strict=True)
        axes.plot(steps, losses, label="training loss (per step)", alpha=0.7)
    if state.evals:
        axes.plot([e["step"] for e in state.evals], [e["loss"] for e in state.evals], marker="o", label="eval loss")
    if state.best_step >= 0:
        axes.axvline(state.best_step, color="gray", linestyle=":", label=f"best (step {state.best_step})")
    axes.set(xlabel="optimizer step", ylabel="loss per learned token", title="Loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _samples_table(before: list[dict[str, str]], after: list[dict[str, str]]) -> list[str]:
    lines = ["| question | before training | after training |", "| --- | --- | --- |"]
    for b, a in zip(before, after, strict=False):
        cells = [b["question"], b["answer"], a["answer"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return lines


def write_report(
    path: Path,
    config: TrainConfig,
    data: Report,
    state: RunState,
    samples_after: list[dict[str, str]],
    reload: dict[str, str],
    manifest: dict[str, Any],
) -> None:
    first, best = state.evals[0], min(state.evals, key=lambda e: e["loss"])
    lines = [
        f"# Adapter training report: {manifest['run_id']}",
        "",
        f"Base model `{manifest['base_model']['name']}` ({manifest['base_model']['source']}), prompt format "
        f"`{manifest['prompt_format']}`, {state.step} optimizer steps"
        + (f", stopped early ({state.stopped})." if state.stopped else "."),
        "",
        "## Data",
        "```",
        data.summary(),
        "```",
        "",
        "## Metrics",
        "",
        "| step | eval loss | perplexity |",
        "| ---: | ---: | ---: |",
        *[f"| {e['step']} | {e['loss']:.4f} | {e['perplexity']:.3f} |" for e in state.evals],
        "",
        f"Eval loss went from {first['loss']:.4f} before training to {best['loss']:.4f} at the best step "
        f"({best['step']}), {best['loss'] / first['loss']:.2f}x. The adapter is the best step's.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Held-out answers",
        "",
        *_samples_table(state.samples_before, samples_after),
        "",
        "## Reload check",
        "",
        f"The written adapter, loaded with `PeftModel.from_pretrained` on a fresh base model, answered "
        f'"{reload["question"]}" with: "{reload["answer"]}"',
        "",
        "## Configuration",
        "```json",
        json.dumps(asdict(config), indent=1),
        "```",
    ]
    path.write_text("\n".join(lines) + "\n")
