"""The `loraserve` command. The server side (torch, transformers) is imported only by `serve`, so the client commands
start fast and run where torch is not installed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from loraserve import __version__
from loraserve.client import commands as client_commands
from loraserve.client.types import LoraserveRpcError
from loraserve.config import (
    ClientConfig,
    EngineConfig,
    LogConfig,
    ModelConfig,
    RagConfig,
    ServerConfig,
    StorageConfig,
    add_options,
    from_namespace,
)
from loraserve.errors import ConfigError
from loraserve.logs import configure_logging_from
from loraserve.trainer.commands import adapter_pull, adapter_push
from loraserve.trainer.commands import add_commands as add_trainer_commands

SERVE_CONFIGS = (ModelConfig, EngineConfig, RagConfig, ServerConfig, StorageConfig, LogConfig)


def _serve(args: argparse.Namespace) -> int:
    server_config = from_namespace(ServerConfig, args)
    model_config = from_namespace(ModelConfig, args)
    engine_config = from_namespace(EngineConfig, args)
    rag_config = from_namespace(RagConfig, args)
    configure_logging_from(args)
    from loraserve.server.app import serve
    from loraserve.storage import use_settings

    use_settings(from_namespace(StorageConfig, args))

    return serve(model_config, engine_config, server_config, rag_config)


Action = Callable[..., argparse.ArgumentParser]


def sentence(help_text: str) -> str:
    return help_text[0].upper() + help_text[1:] + "."


def client_action_group(commands: argparse._SubParsersAction, name: str, help_text: str) -> Action:
    """A command with actions (`loraserve NAME ACTION ...`); returns the function that adds an action, which takes
    the client's options unless it names other settings (an action on S3 takes StorageConfig's)."""
    group = commands.add_parser(name, help=help_text, description=sentence(help_text))
    actions = group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    def action(
        name: str,
        help_text: str,
        handler: Callable[[argparse.Namespace], int],
        settings: type = ClientConfig,
        description: str = "",
    ) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=description or sentence(help_text))
        add_options(sub, settings)
        sub.set_defaults(handler=handler)
        return sub

    return action


def add_adapter_commands(commands: argparse._SubParsersAction) -> None:
    """`loraserve adapters`: push and pull act on S3 (no server needed); load, unload and list on the running server."""
    action = client_action_group(
        commands, "adapters", "push and pull adapters in S3; load, unload and list the running server's adapters"
    )
    push = action(
        "push",
        "upload an adapter folder to S3 as a new version",
        adapter_push,
        StorageConfig,
        "Upload an adapter folder to S3 as a new version, then point 'latest' at it (no server needed).",
    )
    push.add_argument("folder", help="the adapter folder (with manifest.json)")
    push.add_argument("location", help="s3://bucket/prefix")
    push.add_argument("--version", help="version name (default: the run id in the manifest)")
    pull = action(
        "pull",
        "download an adapter version from S3 and verify it",
        adapter_pull,
        StorageConfig,
        "Download an adapter version from S3 and verify every checksum (no server needed).",
    )
    pull.add_argument("location", help="s3://bucket/prefix")
    pull.add_argument("folder", help="where to put the adapter folder")
    pull.add_argument("--version", help="version to fetch (default: latest)")
    load = action("load", "load an adapter into the running server", client_commands.adapters_load)
    load.add_argument("adapter_id", help="the id requests will use")
    load.add_argument("source", help="a folder under the server's --adapter-root, or s3://bucket/prefix")
    load.add_argument("--version", help="the S3 version to load (default: the latest)")
    unload = action(
        "unload", "unload an adapter from the running server once its requests finish", client_commands.adapters_unload
    )
    unload.add_argument("adapter_id", help="the adapter")
    listing = action("list", "list the running server's resident adapters", client_commands.adapters_list)
    listing.add_argument("--json", action="store_true", help="print JSON")


def add_collection_commands(commands: argparse._SubParsersAction) -> None:
    action = client_action_group(commands, "collections", "manage the server's stored document collections")
    listing = action("list", "list the collections and their sizes", client_commands.collections_list)
    listing.add_argument("--json", action="store_true", help="print JSON")
    upsert = action("upsert", "add or replace documents from files", client_commands.collections_upsert)
    upsert.add_argument("collection", help="the collection (created when missing)")
    upsert.add_argument("files", nargs="+", help="text files (one document each, id = file name) or .jsonl files")
    upsert.add_argument("--batch-size", type=int, default=64, help="documents per request (default: 64)")
    delete = action("delete-documents", "remove documents by id", client_commands.collections_delete_documents)
    delete.add_argument("collection", help="the collection")
    delete.add_argument("ids", nargs="+", help="document ids")
    drop = action("drop", "delete a collection and everything in it", client_commands.collections_drop)
    drop.add_argument("collection", help="the collection")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve",
        description="Serve LoRA-adapted LLaMA-family models over gRPC, and talk to a running server.",
        epilog="Every option of a section can also be set by its LORASERVE_* environment variable; a flag wins.",
    )
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server", description="Run the gRPC inference server.")
    for config_cls in SERVE_CONFIGS:
        add_options(serve, config_cls)
    serve.set_defaults(handler=_serve)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=sentence(help_text))
        add_options(sub, ClientConfig)
        sub.set_defaults(handler=getattr(client_commands, name))
        return sub

    generate = client_parser("generate", "generate a completion for one prompt")
    generate.add_argument("prompt", help="the prompt; sent as a user message unless --raw")
    generate.add_argument("--raw", action="store_true", help="send the prompt as raw text, not as a chat message")
    generate.add_argument("--system", help="a system message before the prompt")
    generate.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    generate.add_argument("--json", action="store_true", help="print the whole result as JSON")
    client_commands.add_generation_flags(generate)

    chat = client_parser("chat", "chat interactively, streaming the answers")
    chat.add_argument("--system", help="a system message that starts the conversation")
    client_commands.add_generation_flags(chat)

    rag = client_parser("rag", "answer a question from documents, a stored collection, or both")
    rag.add_argument("query", help="the question")
    rag.add_argument(
        "--document", action="append", default=[], metavar="FILE", help="a document file or .jsonl (repeatable)"
    )
    rag.add_argument("--collection", help="a stored collection to search")
    rag.add_argument("--top-k-passages", type=int, help="passages to give the model (default: 3)")
    rag.add_argument("--min-similarity", type=float, help="least question-passage similarity (default: the server's)")
    rag.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    client_commands.add_generation_flags(rag)

    add_collection_commands(commands)
    add_adapter_commands(commands)

    info = client_parser("info", "describe the served model, adapters, limits and live stats")
    info.add_argument("--json", action="store_true", help="print JSON")

    tokenize = client_parser("tokenize", "count the tokens of a text")
    tokenize.add_argument("text", help="the text")
    tokenize.add_argument("--tokens", action="store_true", help="also list the tokens")

    add_trainer_commands(commands)

    health = client_parser("health", "check health; exit 0 only when SERVING (for container health checks)")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument(
        "--check-timeout",
        dest="health_timeout",
        type=float,
        default=5.0,
        help="seconds to wait for an answer (default: 5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"loraserve {args.command}: error: {error}", file=sys.stderr)
        return 2
    except LoraserveRpcError as error:
        print(f"loraserve {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
