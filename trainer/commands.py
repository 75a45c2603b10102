"""The trainer's CLI commands: `data validate`, `train`, `model push`, and the S3 handlers of `adapters push` and
`adapters pull` (loraserve/cli.py puts them in the `adapters` group, beside the running server's actions)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from loraserve.config import LogConfig, StorageConfig, add_options, from_namespace
from loraserve.trainer.config import DataConfig, TrainConfig


def _load_file(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        from loraserve.errors import ConfigError

        raise ConfigError(f"--config {path}: {error}") from None
    return values


def validate_data(args: argparse.Namespace) -> int:
    """Check a data file; write rejected.jsonl; exit 1 when nothing valid is left or too much was rejected."""
    from loraserve.prompting import load_prompt_format
    from loraserve.trainer.data import DataError, write_rejections
    from loraserve.trainer.examples import LabelError
    from loraserve.trainer.model import load_tokenizer
    from loraserve.trainer.validation import validate

    args.data = args.file
    config = from_namespace(DataConfig, args)
    tokenizer = load_tokenizer(config)
    try:
        report = validate(
            Path(config.data),
            tokenizer,
            load_prompt_format(config.prompt_format, tokenizer),
            config.rules,
            config.max_length,
            config.too_long,
            config.train_on_all_turns,
        )
    except (DataError, LabelError) as error:
        print(f"loraserve data validate: {error}", file=sys.stderr)
        return 1
    write_rejections(Path(args.rejected), report.rejections)
    print(report.summary())
    for rejection in report.rejections[: args.show]:
        print(f"  record {rejection.index}: {rejection.field}: {rejection.reason}")
    if len(report.rejections) > args.show:
        print(f"  ... {len(report.rejections) - args.show} more in {args.rejected}")
    if not report.valid:
        print("no valid conversations left", file=sys.stderr)
        return 1
    if report.error_rate > config.max_error_rate:
        print(
            f"{report.error_rate:.0%} of the records were rejected, more than --max-error-rate "
            f"{config.max_error_rate:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


def train(args: argparse.Namespace) -> int:
    from loraserve.logs import configure_logging_from

    config = from_namespace(TrainConfig, args, _load_file(args.config), file_name=args.config or "")
    if config.dry_run:
        print(json.dumps(asdict(config), indent=2))
        return 0
    if not config.data:
        from loraserve.errors import ConfigError

        raise ConfigError("--data is required (or `data:` in the --config file)")
    configure_logging_from(args)
    from loraserve.trainer.data import DataError
    from loraserve.trainer.train import NotEnoughData, run

    try:
        adapter = run(config)
    except (DataError, NotEnoughData) as error:
        print(f"loraserve train: {error}", file=sys.stderr)
        return 1
    print(adapter)
    return 0


def adapter_push(args: argparse.Namespace) -> int:
    from loraserve.storage import S3Location, StorageError, push, use_settings

    use_settings(from_namespace(StorageConfig, args))
    try:
        version = push(Path(args.folder), S3Location.parse(args.location), args.version)
    except StorageError as error:
        print(f"loraserve adapters push: {error}", file=sys.stderr)
        return 1
    print(version)
    return 0


def model_push(args: argparse.Namespace) -> int:
    """Upload a Hugging Face model folder (for `serve --model s3://...`), writing its manifest first if it has none."""
    from loraserve.storage import MANIFEST, S3Location, StorageError, push, use_settings, write_manifest

    use_settings(from_namespace(StorageConfig, args))
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"loraserve model push: {folder} has no config.json; push a Hugging Face model folder", file=sys.stderr)
        return 1
    if not (folder / MANIFEST).is_file():
        write_manifest(folder, "model")
    try:
        version = push(folder, S3Location.parse(args.location), args.version)
    except StorageError as error:
        print(f"loraserve model push: {error}", file=sys.stderr)
        return 1
    print(version)
    return 0


def adapter_pull(args: argparse.Namespace) -> int:
    from loraserve.storage import S3Location, StorageError, pull, use_settings

    use_settings(from_namespace(StorageConfig, args))
    try:
        folder = pull(S3Location.parse(args.location), Path(args.folder), args.version)
    except StorageError as error:
        print(f"loraserve adapters pull: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register data, train and model on the main parser's subcommands."""

    data = commands.add_parser("data", help="check training data", description="Check training data.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    check = data_commands.add_parser(
        "validate",
        help="check a conversations file and report every rejection",
        description="Check a conversations file and report every rejection.",
    )
    check.add_argument("file", help="JSON array or JSONL of conversations")
    check.add_argument("--rejected", default="rejected.jsonl", help="where to write the rejected records")
    check.add_argument("--show", type=int, default=20, help="rejections to print (default 20)")
    add_options(check, DataConfig)
    check.set_defaults(handler=validate_data)

    run = commands.add_parser(
        "train",
        help="fine-tune a LoRA adapter",
        description="Fine-tune a LoRA adapter (every key of --config is also a flag).",
    )
    run.add_argument("--config", help="YAML file of TrainConfig keys; flags and LORASERVE_* variables win over it")
    add_options(run, TrainConfig)
    add_options(run, LogConfig)
    run.set_defaults(handler=train)

    model = commands.add_parser("model", help="store models in S3", description="Store models in S3.")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    upload_model = model_commands.add_parser(
        "push",
        help="upload a model folder as a new version",
        description="Upload a Hugging Face model folder (safetensors) for `serve --model s3://bucket/prefix`.",
    )
    upload_model.add_argument("folder", help="the model folder (config.json, *.safetensors, tokenizer files)")
    upload_model.add_argument("location", help="s3://bucket/prefix")
    upload_model.add_argument("--version", help="version name (default: a hash of the files)")
    add_options(upload_model, StorageConfig)
    upload_model.set_defaults(handler=model_push)
