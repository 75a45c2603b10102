"""`loraserve train`: setup, then fit.

Setup validates the data (the same checks as `loraserve data validate`), splits off a held-out set with the run's
seed, loads the base model and creates the adapter. The fit loop is plain PyTorch: AdamW with warm-up and a schedule,
gradient accumulation and clipping, evaluation (loss and perplexity) before training and at every evaluation point,
early stopping on the eval loss, and a checkpoint at each evaluation that `--resume` continues from exactly.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from loraserve.errors import ConfigError
from loraserve.prompting import Message, PromptFormat, load_prompt_format
from loraserve.trainer import checkpoints
from loraserve.trainer.artifacts import manifest_for, reload_check, sha256_file, weights_digest, write_adapter
from loraserve.trainer.checkpoints import RunState
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.data import write_rejections
from loraserve.trainer.distributed import Processes
from loraserve.trainer.examples import IGNORE, Example
from loraserve.trainer.model import attach_lora, device_for, load_base
from loraserve.trainer.report import plot_losses, write_report
from loraserve.trainer.validation import Report, validate

logger = logging.getLogger(__name__)
SAMPLES = 3  # held-out conversations whose answers the report shows before and after training


class NotEnoughData(ValueError):
    """Validation left nothing to train on, or rejected more than max_error_rate of the records."""


@dataclass
class Setup:
    """Everything the fit loop needs."""

    config: TrainConfig
    processes: Processes
    device: torch.device
    model: Any  # the PEFT model
    tokenizer: Any
    prompt_format: PromptFormat
    report: Report
    train: list[Example]
    evaluation: list[Example]
    sample_conversations: list[tuple[Message, ...]]
    base_folder: Path
    base_name: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split(report: Report, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the training and held-out examples: a seeded shuffle, at least one held out."""
    order = list(range(len(report.examples)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(len(order) * fraction))
    return sorted(order[held_out:]), sorted(order[:held_out])


def prepare(config: TrainConfig) -> Setup:
    device = device_for(config)
    processes = Processes.start(device.type)
    device = processes.device(device)
    seed_everything(config.seed)
    model, tokenizer, folder, name = load_base(config, device)
    prompt_format = load_prompt_format(config.prompt_format, tokenizer)
    report = validate(
        Path(config.data),
        tokenizer,
        prompt_format,
        config.rules,
        config.max_length,
        config.too_long,
        config.train_on_all_turns,
    )
    output = Path(config.output)
    if processes.main:
        output.mkdir(parents=True, exist_ok=True)
        write_rejections(output / "rejected.jsonl", report.rejections)
        logger.info(
            "data validated", extra={"format": report.format, "valid": report.valid, "rejected": len(report.rejections)}
        )
    check_enough(report, config)
    train_at, eval_at = split(report, config.eval_fraction, config.seed)
    if not train_at:
        raise NotEnoughData(
            f"{report.valid} valid conversations leave none to train on after holding "
            f"{len(eval_at)} out; add data or lower --eval-fraction"
        )
    samples = [report.conversations[i] for i in eval_at[:SAMPLES]]
    peft_model = attach_lora(model, config)
    return Setup(
        config,
        processes,
        device,
        peft_model,
        tokenizer,
        prompt_format,
        report,
        [report.examples[i] for i in train_at],
        [report.examples[i] for i in eval_at],
        samples,
        folder,
        name,
    )


def check_enough(report: Report, config: TrainConfig) -> None:
    if not report.valid:
        reasons = sorted({r.reason for r in report.rejections})[:5]
        raise NotEnoughData(
            f"no valid conversations in {report.path} ({report.total} records); first reasons: {'; '.join(reasons)}"
        )
    if report.error_rate > config.max_error_rate:
        raise NotEnoughData(
            f"{len(report.rejections)} of {report.total} records rejected ({report.error_rate:.0%}), "
            f"more than --max-error-rate {config.max_error_rate:.0%}; see rejected.jsonl"
        )


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Padding is masked by position (attention mask 0, label -100), never by token id: the pad
    token is often the EOS token, which the labels must keep."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def epoch_batches(
    examples: list[Example], size: int, seed: int, epoch: int, processes: Processes
) -> list[list[Example]]:
    """This process's micro-batches for an epoch: a shuffle seeded by (seed, epoch), dealt round-robin. Every process
    gets as many (the first batches repeat to even them out, as DistributedSampler pads): a process with one batch
    more would wait forever for the others to synchronise its gradients."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches = [[examples[i] for i in order[j : j + size]] for j in range(0, len(order), size)]
    short = -len(batches) % processes.world
    batches += [batches[i % len(batches)] for i in range(short)]
    return batches[processes.rank :: processes.world]


def steps_per_epoch(config: TrainConfig, train_size: int, processes: Processes) -> int:
    batches = math.ceil(train_size / config.batch_size)
    return math.ceil(max(1, math.ceil(batches / processes.world)) / config.gradient_accumulation)


def learned_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float logits [N, vocab] of the N positions whose next token is learned, and those tokens [N].

    The LM head runs on these positions only (transformers' boolean logits_to_keep): on a small model it is a fifth
    of the FLOPs, and its [tokens, vocab] output the largest activation, while prompts and padding learn nothing."""
    targets = batch["labels"][:, 1:]
    learned = targets != IGNORE
    keep = torch.nn.functional.pad(learned, (0, 1), value=False)  # position p predicts token p + 1
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return output.logits.float(), targets[learned]


@torch.inference_mode()
def evaluate(
    model: Any, examples: list[Example], config: TrainConfig, pad_id: int, setup: Setup
) -> tuple[float, float]:
    """Mean loss per learned token over the held-out set, and its perplexity."""
    model.eval()
    shard = examples[setup.processes.rank :: setup.processes.world]
    total, count = 0.0, 0
    for start in range(0, len(shard), config.batch_size):
        batch = collate(shard[start : start + config.batch_size], pad_id, setup.device)
        logits, targets = learned_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
    total, count = setup.processes.sum([total, float(count)], setup.device)
    model.train()
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50))


@torch.inference_mode()
def sample_answers(setup: Setup) -> list[dict[str, str]]:
    """Greedy answers to the held-out conversations' last question (on the main process only)."""
    if not setup.processes.main:
        return []
    model, tokenizer, out = setup.model, setup.tokenizer, []
    model.eval()
    for messages in setup.sample_conversations:
        prompt = messages[:-1]
        text = setup.prompt_format.render(prompt, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=setup.prompt_format.adds_special_tokens)
        ids = {k: v.to(setup.device) for k, v in ids.items()}
        generated = model.generate(
            **ids,
            max_new_tokens=setup.config.sample_max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append({"question": prompt[-1].content, "expected": messages[-1].content, "answer": answer.strip()})
    model.train()
    return out


def adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_weights(model: Any, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v.to(next(model.parameters()).device) for k, v in weights.items()})


class Trainer:
    """The fit loop over a prepared Setup."""

    def __init__(self, setup: Setup) -> None:
        from transformers import get_scheduler

        self.setup = setup
        self.config = config = setup.config
        self.pad_id = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
        self.model = setup.model
        self.wrapped = DistributedDataParallel(self.model) if setup.processes.world > 1 else self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.total_steps = config.epochs * steps_per_epoch(config, len(setup.train), setup.processes)
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=round(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.checkpoints = Path(config.output) / "checkpoints"
        self.best: dict[str, torch.Tensor] | None = None
        self.state = RunState()

    def resume_or_start(self) -> None:
        checkpoint = checkpoints.latest(self.checkpoints) if self.config.resume else None
        if self.config.resume and checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {self.checkpoints}")
        if checkpoint is not None:
            self.state, weights = checkpoints.load(checkpoint, self.config, self.optimizer, self.scheduler)
            set_adapter_weights(self.model, weights)
            best = self.checkpoints.parent / "best.safetensors"
            if best.exists():
                self.best = load_file(best)
            logger.info("resumed", extra={"checkpoint": str(checkpoint), "step": self.state.step})
            return
        self.state.samples_before = sample_answers(self.setup)
        self.record_eval()

    def record_eval(self) -> bool:
        """Evaluate, remember the best adapter; True when early stopping says stop."""
        loss, perplexity = evaluate(self.model, self.setup.evaluation, self.config, self.pad_id, self.setup)
        self.state.evals.append({"step": self.state.step, "loss": loss, "perplexity": perplexity})
        logger.info(
            "evaluation",
            extra={
                "step": self.state.step,
                "eval_loss": round(loss, 4),
                "perplexity": round(perplexity, 3),
                "rank": self.setup.processes.rank,
            },
        )
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = loss, self.state.step
            self.state.evals_without_improvement = 0
            self.best = adapter_weights(self.model)
            if self.setup.processes.main:
                self.checkpoints.parent.mkdir(parents=True, exist_ok=True)
                save_file(
                    {k: v.cpu().contiguous() for k, v in self.best.items()},
                    self.checkpoints.parent / "best.safetensors",
                )
            return False
        self.state.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        return bool(patience) and self.state.evals_without_improvement >= patience

    def checkpoint(self) -> None:
        if self.setup.processes.main:
            checkpoints.save(
                self.checkpoints, self.config, self.state, adapter_weights(self.model), self.optimizer, self.scheduler
            )
        self.setup.processes.barrier()

    def fit(self) -> RunState:
        from tqdm import tqdm

        self.resume_or_start()
        self.model.train()
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="training",
            unit="step",
            # A bar only on a terminal: in a pipe its carriage-return updates glue onto the next log line (and the
            # "step" log records say the same for a machine).
            disable=not self.setup.processes.main or not sys.stderr.isatty(),
        )
        try:
            while self.state.epoch < self.config.epochs and not self.state.stopped:
                self.run_epoch(progress)
        finally:
            progress.close()
        if self.best is not None:
            set_adapter_weights(self.model, self.best)  # the best checkpoint is the result
        return self.state

    def run_epoch(self, progress: Any) -> None:
        config, setup, state = self.config, self.setup, self.state
        batches = epoch_batches(setup.train, config.batch_size, config.seed, state.epoch, setup.processes)
        group: list[list[Example]] = []
        for index in range(state.batch, len(batches)):
            group.append(batches[index])
            boundary = len(group) == config.gradient_accumulation or index == len(batches) - 1
            if not boundary:
                continue
            started = time.perf_counter()
            loss = self.optimizer_step(group)
            state.batch, group = index + 1, []
            state.train_losses.append((state.step, loss))
            progress.update(1)
            logger.info(
                "step",
                extra={
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": round(loss, 4),
                    "lr": self.scheduler.get_last_lr()[0],
                    "rank": setup.processes.rank,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            if config.eval_steps and state.step % config.eval_steps == 0 and self.evaluate_and_checkpoint():
                return
            if config.max_steps and state.step >= config.max_steps:
                state.stopped = "max_steps"
                self.evaluate_and_checkpoint()
                return
        state.epoch, state.batch = state.epoch + 1, 0
        if not config.eval_steps:
            self.evaluate_and_checkpoint()

    def evaluate_and_checkpoint(self) -> bool:
        stop = self.record_eval()
        if stop and not self.state.stopped:
            self.state.stopped = "early stopping"
        self.checkpoint()
        return stop

    def optimizer_step(self, group: list[list[Example]]) -> float:
        """Forward and backward over the micro-batches of one step (gradients synchronised on the last), then one
        clipped optimizer step. Returns the step's mean loss."""
        losses = []
        for i, batch in enumerate(group):
            inputs = collate(batch, self.pad_id, self.setup.device)
            accumulating = isinstance(self.wrapped, DistributedDataParallel) and i < len(group) - 1
            with self.wrapped.no_sync() if accumulating else nullcontext():
                logits, targets = learned_logits(self.wrapped, inputs)
                loss = torch.nn.functional.cross_entropy(logits, targets) / len(group)
                loss.backward()
            losses.append(float(loss.detach()) * len(group))
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return sum(losses) / len(losses)


def run(config: TrainConfig) -> Path:
    """Train, then (on the main process) write the adapter, check it loads, and write the report. Returns the
    adapter folder."""
    setup = prepare(config)
    state = Trainer(setup).fit()
    output = Path(config.output)
    adapter = output / "adapter"
    if setup.processes.main:
        finish(setup, state, adapter)
    setup.processes.barrier()
    setup.processes.stop()
    return adapter


def finish(setup: Setup, state: RunState, adapter: Path) -> None:
    config, report = setup.config, setup.report
    best = min(state.evals, key=lambda e: e["loss"])
    metrics = {
        "eval_loss_before": state.evals[0]["loss"],
        "perplexity_before": state.evals[0]["perplexity"],
        "eval_loss_best": best["loss"],
        "perplexity_best": best["perplexity"],
        "best_step": best["step"],
        "steps": state.step,
        "stopped": state.stopped,
        "train_examples": len(setup.train),
        "eval_examples": len(setup.evaluation),
    }
    base = {
        "source": config.model,
        "name": setup.base_name,
        "architecture": (setup.model.config.architectures or [""])[0],
        "weights_sha256": weights_digest(setup.base_folder),
    }
    data = {
        "path": config.data,
        "sha256": sha256_file(Path(config.data)),
        "format": report.format,
        "records": report.total,
        "valid": report.valid,
        "rejected": len(report.rejections),
    }
    manifest = manifest_for(config, base, data, metrics, setup.prompt_format.name)
    samples_after = sample_answers(setup)
    write_adapter(adapter, setup.model, setup.tokenizer, setup.prompt_format.name, manifest)
    reload = reload_check(
        adapter,
        lambda: load_base(config, setup.device)[:2],
        setup.prompt_format,
        setup.sample_conversations[0][:-1],
        config.sample_max_new_tokens,
    )
    output = adapter.parent
    plot_losses(state, output / "loss_curve.png")
    write_report(output / "report.md", config, report, state, samples_after, reload, manifest)
    logger.info(
        "adapter written",
        extra={
            "adapter": str(adapter),
            "run_id": manifest["run_id"],
            "eval_loss_before": round(metrics["eval_loss_before"], 4),
            "eval_loss_best": round(metrics["eval_loss_best"], 4),
            "rank": setup.processes.rank,
        },
    )
