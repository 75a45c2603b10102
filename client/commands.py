"""The client-side CLI commands: generate, chat, rag, collections, adapters, info, tokenize, health. They need grpc
only, never torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from loraserve.client.client import Client, tls_credentials
from loraserve.client.types import AdapterInfo, GenerationOptions, LoraserveRpcError, StreamChunk
from loraserve.config import ClientConfig, from_namespace
from loraserve.errors import ConfigError


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Request options shared by generate, chat and rag; unset ones leave the server's defaults."""
    group = parser.add_argument_group("generation")
    group.add_argument("--adapter", dest="adapter_id", default="", help="LoRA adapter id (default: the base model)")
    group.add_argument("--max-new-tokens", type=int, help="most new tokens (default: the server's)")
    group.add_argument("--min-new-tokens", type=int, help="no EOS or stop sequence before this many tokens")
    group.add_argument("--temperature", type=float, help="sampling temperature; unset or 0 is greedy")
    group.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    group.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    group.add_argument("--repetition-penalty", type=float, help="> 1 discourages repetition")
    group.add_argument("--stop", dest="stop_sequences", action="append", default=[], help="stop sequence (repeatable)")
    output = group.add_mutually_exclusive_group()
    output.add_argument(
        "--json-schema", metavar="FILE|JSON", help="answer with JSON that matches this schema (a file, or JSON text)"
    )
    output.add_argument("--json-object", action="store_true", default=None, help="answer with any JSON object")
    output.add_argument("--regex", help="answer with text that matches this regular expression")
    output.add_argument(
        "--choice", type=_choices, metavar="A,B,...", help="answer with exactly one of these comma-separated strings"
    )
    output.add_argument("--grammar", metavar="FILE|LARK", help="answer in this Lark grammar (a file, or its text)")


def _choices(value: str) -> list[str]:
    return [item.strip() for item in value.split(",")]


def _file_or_text(value: str) -> str:
    """The contents of the file `value` names, or `value` itself when no such file exists."""
    path = Path(value)
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else value
    except OSError as error:
        raise ConfigError(f"{value}: {error.strerror}") from None


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    names = (
        "adapter_id",
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "repetition_penalty",
        "stop_sequences",
        "json_schema",
        "json_object",
        "regex",
        "choice",
        "grammar",
    )
    options = {n: getattr(args, n) for n in names if getattr(args, n) not in (None, "", [])}
    for name in ("json_schema", "grammar"):
        if name in options:
            options[name] = _file_or_text(options[name])
    return GenerationOptions(**options)  # type: ignore[typeddict-item]


# The variable that gives `loraserve serve` its certificate (ServerConfig.tls_cert); `health` trusts it.
SERVER_CERT_ENV = "LORASERVE_TLS_CERT"


def client_for(config: ClientConfig, timeout: float | None = None, server_cert: str = "") -> Client:
    """A client from the command's options, and the bearer token from LORASERVE_TOKEN (never a flag: command lines are
    visible to other users). TLS when a CA, a client certificate or server_cert is given: server_cert is the server's
    own certificate, trusted when no CA is given, whose names the server is checked against."""
    ca = config.tls_ca or server_cert
    credentials, options = None, []
    if ca or config.client_cert:
        try:
            credentials = tls_credentials(ca, config.client_cert, config.client_key)
        except OSError as error:
            raise ConfigError(f"{error.filename}: {error.strerror}") from None
        if server_cert:
            options = _name_override(config.target, server_cert)
    return Client(
        config.target,
        timeout=timeout or config.timeout,
        credentials=credentials,
        token=os.environ.get("LORASERVE_TOKEN") or None,
        channel=grpc.secure_channel(config.target, credentials, options) if options else None,
    )


def _name_override(target: str, certificate: str) -> list[tuple[str, str]]:
    """The channel option that checks the server's certificate against a name it carries when the target's host is
    not one of them (a health check connects to localhost; the certificate names the service)."""
    names = certificate_names(certificate)
    host = target.rsplit("/", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if not names or host in names:
        return []
    name = names[0].replace("*", "loraserve", 1)  # a wildcard name: any name it covers will do
    return [("grpc.ssl_target_name_override", name)]


def certificate_names(path: str) -> list[str]:
    """The DNS names, then the IP addresses, a PEM certificate is for (else its common name); [] if unreadable."""
    # The standard library reads a certificate file only through this helper of its own tests (there since Python
    # 3.3); cryptography, which reads it publicly, is no dependency of the client.
    import _ssl

    decode = getattr(_ssl, "_test_decode_cert", None)
    try:
        decoded = decode(path) if decode else {}
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return []
    alternatives = decoded.get("subjectAltName", ())
    names = [v for k, v in alternatives if k == "DNS"] + [v for k, v in alternatives if k == "IP Address"]
    return names or [v for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]


def _client(args: argparse.Namespace) -> Client:
    return client_for(from_namespace(ClientConfig, args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _stream_to_stdout(chunks: Any) -> StreamChunk | None:
    last = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    return last


def generate(args: argparse.Namespace) -> int:
    """Send one prompt (as a user message, or raw with --raw) and print the answer."""
    messages = None
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
    prompt = args.prompt if args.raw else None
    with _client(args) as client:
        if args.stream:
            last = _stream_to_stdout(client.stream(prompt, messages=messages, **generation_options(args)))
            if args.json and last is not None:
                _print_json(dataclasses.asdict(last))
            return 0
        result = client.generate(prompt, messages=messages, **generation_options(args))
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(result.text)
    return 0


def chat(args: argparse.Namespace) -> int:
    """An interactive conversation, streamed. /reset forgets it, /exit (or end of input) leaves."""
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as client:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            sys.stdout.write("assistant> ")
            reply: list[str] = []
            for chunk in client.stream(messages=history, **generation_options(args)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})


def read_documents(paths: list[str]) -> list[dict[str, Any]]:
    """Documents from files: a .jsonl file holds one {"id", "text", "title"?, "metadata"?} object per line; any
    other file is one document, its file name the id and its stem the title."""
    documents: list[dict[str, Any]] = []
    for name in paths:
        path = Path(name)
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{number}: not JSON ({error.msg})") from None
                if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "text" not in item:
                    raise ConfigError(f"{path}:{number}: each line needs an object with string id and text")
                documents.append(item)
        else:
            documents.append({"id": path.name, "text": path.read_text(encoding="utf-8"), "title": path.stem})
    return documents


def rag(args: argparse.Namespace) -> int:
    """Answer a question from document files, a stored collection, or both."""
    documents = read_documents(args.document)
    with _client(args) as client:
        answer = client.rag_query(
            args.query,
            documents,
            collection=args.collection or "",
            top_k=args.top_k_passages,
            min_similarity=args.min_similarity,
            **generation_options(args),
        )
    if args.json:
        _print_json(dataclasses.asdict(answer))
        return 0
    print(answer.text)
    for source in answer.sources:
        where = f"{source.collection}/" if source.collection else ""
        mark = "cited" if source.cited else "not cited"
        print(
            f"[{source.rank}] {where}{source.document_id} ({mark}; similarity {source.similarity:.2f}): "
            f"{source.passage[:100]}"
        )
    return 0


def collections_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        collections = client.list_collections()
    if args.json:
        _print_json([dataclasses.asdict(c) for c in collections])
        return 0
    for c in collections:
        state = "" if c.compatible else "  (another embedding model: delete and upsert again)"
        print(
            f"{c.name}: {c.document_count} documents, {c.passage_count} passages, {c.size_bytes / 1e6:.1f} MB, "
            f"{c.embedding_model}, updated {c.update_time:%Y-%m-%d %H:%M:%S}{state}"
        )
    return 0


def collections_upsert(args: argparse.Namespace) -> int:
    """Upsert documents from files into a collection, in batches (each batch durable when it returns)."""
    documents = read_documents(args.files)
    upserted = embedded = 0
    with _client(args) as client:
        for first in range(0, len(documents), args.batch_size):
            result = client.upsert_documents(args.collection, documents[first : first + args.batch_size])
            upserted += result.upserted_documents
            embedded += result.embedded_passages
            print(f"{upserted}/{len(documents)} documents", file=sys.stderr)
    info = result.collection
    print(
        f"{args.collection}: upserted {upserted} documents ({embedded} passages embedded); now {info.document_count} "
        f"documents, {info.passage_count} passages"
    )
    return 0


def collections_delete_documents(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.delete_documents(args.collection, args.ids)
    print(f"{args.collection}: deleted {result.deleted_documents} documents")
    for missing in result.not_found:
        print(f"not found: {missing}", file=sys.stderr)
    return 0


def collections_drop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_collection(args.collection)
    print(f"deleted collection {args.collection}")
    return 0


def _print_adapter(adapter: AdapterInfo) -> None:
    version = f", version {adapter.version}" if adapter.version else ""
    print(
        f"{adapter.id}: rank {adapter.rank}, alpha {adapter.alpha:g}, {' '.join(adapter.target_modules)}; "
        f"{adapter.active_requests} active requests; from {adapter.source}{version}"
    )


def adapters_load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.load_adapter(args.adapter_id, args.source, version=args.version)
    _print_adapter(result.adapter)
    for evicted in result.evicted:
        print(f"unloaded {evicted} to make room", file=sys.stderr)
    return 0


def adapters_unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload_adapter(args.adapter_id)
    print(f"unloaded {args.adapter_id}")
    return 0


def adapters_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list_adapters()
    if args.json:
        _print_json(dataclasses.asdict(listing))
        return 0
    for adapter in listing.adapters:
        _print_adapter(adapter)
    print(f"{len(listing.adapters)} of at most {listing.max_adapters} adapters resident")
    return 0


def info(args: argparse.Namespace) -> int:
    """Describe the served model, its adapters, limits and live stats."""
    with _client(args) as client:
        model = client.model_info()
    if args.json:
        _print_json(dataclasses.asdict(model))
        return 0
    print(
        f"{model.model_name} ({model.architecture}, {model.dtype} on {model.device}, "
        f"context {model.max_sequence_length} tokens, quantization {model.quantization})"
    )
    print(f"source: {model.model_source}   prompt format: {model.prompt_format}   loraserve {model.server_version}")
    for adapter in model.adapters:
        print(
            f"adapter {adapter.id}: r={adapter.rank} alpha={adapter.alpha:g} "
            f"targets={','.join(adapter.target_modules)} ({adapter.source})"
        )
    print("limits: " + ", ".join(f"{k}={v}" for k, v in model.limits.items()))
    print("stats:  " + ", ".join(f"{k}={v:g}" for k, v in model.stats.items()))
    return 0


def tokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.tokenize(args.text, return_tokens=args.tokens)
    print(result.token_count)
    for token in result.tokens:
        print(f"{token.id}\t{token.text!r}")
    return 0


def health(args: argparse.Namespace) -> int:
    """Print the health status; exit 0 only when SERVING (a container health check).

    In a container the check shares the server's environment: when the server serves TLS from LORASERVE_TLS_CERT, the
    check connects over TLS (not plaintext), trusting that certificate unless --tls-ca is given, and checks the server
    against the names it carries (not localhost's). A client certificate, for mutual TLS, comes only from
    --client-cert/--client-key."""
    config = from_namespace(ClientConfig, args)
    server_cert = os.environ.get(SERVER_CERT_ENV, "")
    try:
        with client_for(config, min(config.timeout, args.health_timeout), server_cert) as client:
            status = client.health(args.service)
    except LoraserveRpcError as error:
        print(f"{error.code.name}: {error.details}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1
