"""CollectionService and RagQuery over stored collections, through gRPC: upsert, list, delete; answers that cite
real sources; limits published in ModelInfo and enforced; a changed embedding model detected; collections that
survive a restart and a kill -9, including one in the middle of writing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from loraserve.client import Client, LoraserveRpcError
from loraserve.server.retrieval.documents import Document
from loraserve.server.retrieval.store import CollectionStore
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

LORASERVE = [sys.executable, "-m", "loraserve.cli"]
KNOWLEDGE = [
    {"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower in Paris was completed in 1889."},
    {"id": "bananas", "title": "Bananas", "text": "Bananas are yellow and rich in potassium.", "metadata": {"k": "v"}},
    {"id": "keys", "text": "To rotate API keys, open Settings, choose Security and press Rotate.\n\nOld keys expire."},
]


def rpc_error(call) -> LoraserveRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(LoraserveRpcError) as error:
        call()
    return error.value


def test_upsert_list_delete_and_drop(tiny_server) -> None:
    client = tiny_server.client
    first = client.upsert_documents("crud", KNOWLEDGE)
    assert (first.upserted_documents, first.passages, first.embedded_passages) == (3, 4, 4)
    assert first.collection.document_count == 3 and first.collection.compatible
    again = client.upsert_documents("crud", KNOWLEDGE[:1])
    assert again.embedded_passages == 0 and again.collection.document_count == 3
    listed = {c.name: c for c in client.list_collections()}
    assert listed["crud"].passage_count == 4 and listed["crud"].embedding_model.startswith("all-MiniLM-L6-v2@")
    assert listed["crud"].update_time >= listed["crud"].create_time and listed["crud"].size_bytes > 0
    deleted = client.delete_documents("crud", ["bananas", "missing"])
    assert (deleted.deleted_documents, deleted.not_found, deleted.collection.document_count) == (1, ("missing",), 2)
    client.delete_collection("crud")
    assert "crud" not in {c.name for c in client.list_collections()}
    assert rpc_error(lambda: client.delete_collection("crud")).code == grpc.StatusCode.NOT_FOUND


def test_answers_from_a_collection_cite_real_sources(tiny_server) -> None:
    client = tiny_server.client
    client.upsert_documents("answers", KNOWLEDGE)
    answer = client.rag_query("How do I rotate my API keys?", collection="answers", max_new_tokens=24)
    assert answer.sources and answer.sources[0].document_id == "keys" and answer.sources[0].collection == "answers"
    top = answer.sources[0]
    assert top.passage == KNOWLEDGE[2]["text"][top.start_char : top.end_char] and top.passage_index == 0
    assert top.similarity >= 0.35 and top.bm25_score is not None and top.score <= 1
    numbers = {int(n) for group in re.findall(r"\[([\d, ]+)\]", answer.text) for n in group.split(",")}
    assert numbers <= {s.rank for s in answer.sources}  # the tiny model writes nonsense; its citations stay honest
    assert {s.rank for s in answer.sources if s.cited} == numbers
    both = client.rag_query(
        "What fruit has potassium?",
        [{"id": "inline", "text": "Avocados have even more potassium than bananas."}],
        collection="answers",
        top_k=2,
        max_new_tokens=2,
    )
    assert {(s.collection, s.document_id) for s in both.sources} == {("", "inline"), ("answers", "bananas")}
    assert [s.metadata for s in both.sources if s.document_id == "bananas"] == [{"k": "v"}]
    nothing = client.rag_query("Who won the football World Cup in 2014?", collection="answers")
    assert nothing.sources == () and nothing.generated_token_count == 0 and "do not cover" in nothing.text


def test_bad_requests_get_precise_codes_and_published_limits(start_server) -> None:
    running = start_server(
        rag_options={"max_rag_documents": 2, "max_upsert_documents": 2, "max_rag_document_chars": 60}
    )
    client = running.client
    limits = client.model_info().limits
    assert (limits["max_rag_documents"], limits["max_upsert_documents"], limits["max_rag_document_chars"]) == (2, 2, 60)
    assert limits["max_rag_query_chars"] == 2000 and limits["max_rag_top_k"] == 20
    docs = [{"id": str(i), "text": f"Document number {i}."} for i in range(3)]
    cases = [
        (lambda: client.rag_query("q", collection="nowhere"), grpc.StatusCode.NOT_FOUND, "no collection 'nowhere'"),
        (lambda: client.rag_query(" ", collection="x"), grpc.StatusCode.INVALID_ARGUMENT, "query: must not be empty"),
        (lambda: client.rag_query("q"), grpc.StatusCode.INVALID_ARGUMENT, "give documents, a collection, or both"),
        (lambda: client.rag_query("q", docs), grpc.StatusCode.INVALID_ARGUMENT, "at most 2 documents"),
        (lambda: client.rag_query("q" * 2001, docs[:1]), grpc.StatusCode.INVALID_ARGUMENT, "at most 2000"),
        (lambda: client.rag_query("q", docs[:1], top_k=30), grpc.StatusCode.INVALID_ARGUMENT, "top_k: must be in"),
        (lambda: client.upsert_documents("c", docs), grpc.StatusCode.INVALID_ARGUMENT, "at most 2 documents"),
        (lambda: client.upsert_documents("c", []), grpc.StatusCode.INVALID_ARGUMENT, "at least one document"),
        (
            lambda: client.upsert_documents("c", [{"id": "a", "text": "x" * 61}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[0].text: has 61 characters; at most 60",
        ),
        (
            lambda: client.upsert_documents("../escape", docs[:1]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not a collection name",
        ),
        (lambda: client.delete_documents("c", []), grpc.StatusCode.INVALID_ARGUMENT, "document_ids"),
        (lambda: client.delete_documents("nowhere", ["a"]), grpc.StatusCode.NOT_FOUND, "no collection"),
    ]
    for call, code, fragment in cases:
        error = rpc_error(call)
        assert error.code == code and fragment in error.details, (fragment, error)
    assert client.health() == "SERVING" and client.list_collections() == []


def test_a_collection_of_another_embedding_model_is_refused(start_server, tmp_path: Path, embedder) -> None:
    store = CollectionStore(tmp_path)
    old = store.get("old", create_for=("some-other-model@0000000000000000", embedder.dimensions))

    class Other:
        identity = "some-other-model@0000000000000000"

        def embed(self, texts):
            return embedder.embed(texts)

    old.upsert([Document("d", "Paris is the capital of France.")], Other(), 800, 150)
    store.close()
    running = start_server(rag_options={"rag_store": str(tmp_path)})
    [info] = running.client.list_collections()
    assert info.name == "old" and not info.compatible and info.embedding_model == Other.identity
    for call in (
        lambda: running.client.rag_query("capital of France?", collection="old"),
        lambda: running.client.upsert_documents("old", [{"id": "e", "text": "More."}]),
    ):
        error = rpc_error(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "delete the collection" in error.details


def test_collections_survive_a_restart(start_server, tmp_path: Path) -> None:
    first = start_server(rag_options={"rag_store": str(tmp_path)})
    first.client.upsert_documents("kept", KNOWLEDGE)
    first.close()
    second = start_server(rag_options={"rag_store": str(tmp_path)})
    assert [(c.name, c.document_count) for c in second.client.list_collections()] == [("kept", 3)]
    answer = second.client.rag_query("When was the Eiffel Tower built?", collection="kept", max_new_tokens=2)
    assert answer.sources[0].document_id == "eiffel"


def test_an_acknowledged_upsert_survives_kill_9(
    tiny_model_dir: Path, tmp_path: Path, free_port, wait_for_health
) -> None:
    port = free_port()
    store = tmp_path / "store"
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory", "64MB"]
    listen = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--rag-store", str(store)]
    process = subprocess.Popen(
        [*LORASERVE, "serve", *model, *listen],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            wait_for_health(client, "SERVING", process)
            for i in range(5):  # several transactions; the last acknowledged one must be there after the kill
                client.upsert_documents("durable", [{"id": f"doc-{i}", "text": f"Fact number {i} is true."}])
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert (store / "durable.sqlite-wal").exists()  # the writes were in the log, not yet checkpointed
    reopened = CollectionStore(store)
    collection = reopened.get("durable")
    assert collection.info(collection.embedding_model).documents == 5
    assert len(collection.index().ids) == 5
    reopened.close()
    listed = subprocess.run(
        [*LORASERVE, "collections", "list", "--json", "--target", f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 1 and "UNAVAILABLE" in listed.stderr  # the killed server is really gone


BIG_UPSERT = 20_000  # documents of one text: embedded once, then 20,000 rows and 30 MB of vectors to write


def serve_collections(tiny_model_dir: Path, store: Path, port: int) -> subprocess.Popen:
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory", "64MB"]
    listen = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--rag-store", str(store)]
    limits = ["--max-upsert-documents", str(BIG_UPSERT)]
    command = [*LORASERVE, "serve", *model, *listen, *limits]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_during_upsert(process: subprocess.Popen, port: int, collection: str, mid_write: Callable[[], bool]) -> None:
    """Send a big upsert, kill -9 the server once `mid_write` says the write is under way, and check that the call
    never succeeded."""
    documents = [
        pb.Document(id=f"big-{i}", text="Ships carried printed books to every port.") for i in range(BIG_UPSERT)
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.CollectionServiceStub(channel)
        call = stub.UpsertDocuments.future(
            pb.UpsertDocumentsRequest(collection=collection, documents=documents), timeout=120
        )
        end = time.monotonic() + 120
        while not mid_write() and not call.done() and time.monotonic() < end:
            time.sleep(0.002)
        assert not call.done(), "the upsert finished before the write could be interrupted"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert call.exception(timeout=30).code() == grpc.StatusCode.UNAVAILABLE


def test_kill_9_while_a_new_collection_is_written_leaves_no_collection_and_the_next_upsert_succeeds(
    tiny_model_dir: Path, tmp_path: Path, free_port, wait_for_health, start_server
) -> None:
    port, store = free_port(), tmp_path / "store"
    process = serve_collections(tiny_model_dir, store, port)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            wait_for_health(client, "SERVING", process)
        kill_during_upsert(process, port, "fresh", lambda: any(store.glob(".creating-*")))
    finally:
        if process.poll() is None:
            process.kill()
    assert list(store.glob(".creating-*"))  # what the killed process was building is still on disk ...
    restarted = start_server(rag_options={"rag_store": str(store)})
    assert list(store.glob(".creating-*")) == []  # ... until the store opens again
    assert restarted.client.list_collections() == []
    outcome = restarted.client.upsert_documents("fresh", KNOWLEDGE)
    assert outcome.collection.document_count == 3
    assert [c.name for c in restarted.client.list_collections()] == ["fresh"]


def test_kill_9_in_the_middle_of_an_upsert_keeps_the_collection_as_it_was(
    tiny_model_dir: Path, tmp_path: Path, free_port, wait_for_health, start_server
) -> None:
    port, store = free_port(), tmp_path / "store"
    process = serve_collections(tiny_model_dir, store, port)
    wal = store / "kept.sqlite-wal"
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            wait_for_health(client, "SERVING", process)
            client.upsert_documents("kept", KNOWLEDGE)
            client.upsert_documents("kept", [{"id": "extra", "text": "Venice printed more books than Paris."}])
            logged = wal.stat().st_size
        # SQLite spills a transaction larger than its page cache into the log before the commit: the log growing
        # by a megabyte means the big transaction is being written.
        kill_during_upsert(process, port, "kept", lambda: wal.stat().st_size > logged + (1 << 20))
    finally:
        if process.poll() is None:
            process.kill()
    restarted = start_server(rag_options={"rag_store": str(store)})
    [info] = restarted.client.list_collections()
    assert (info.name, info.document_count, info.passage_count) == ("kept", 4, 5)
    answer = restarted.client.rag_query("Which city printed more books?", collection="kept", max_new_tokens=2)
    assert answer.sources[0].document_id == "extra"
    assert restarted.client.upsert_documents("kept", KNOWLEDGE[:1]).collection.document_count == 4


def test_the_collections_commands(tiny_server, tmp_path: Path) -> None:
    target = ["--target", tiny_server.target]
    (tmp_path / "eiffel.txt").write_text(KNOWLEDGE[0]["text"])
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(d) for d in KNOWLEDGE[1:]) + "\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LORASERVE, *args], capture_output=True, text=True, timeout=120)

    upserted = cli("collections", "upsert", *target, "cli", str(tmp_path / "eiffel.txt"), str(tmp_path / "more.jsonl"))
    assert upserted.returncode == 0, upserted.stderr
    assert "upserted 3 documents (4 passages embedded); now 3 documents, 4 passages" in upserted.stdout
    listed = json.loads(cli("collections", "list", *target, "--json").stdout)
    assert {c["name"]: c["document_count"] for c in listed}["cli"] == 3
    rag = cli("rag", *target, "When was the Eiffel Tower completed?", "--collection", "cli", "--max-new-tokens", "2")
    assert rag.returncode == 0 and "[1] cli/eiffel.txt (" in rag.stdout, rag.stderr
    deleted = cli("collections", "delete-documents", *target, "cli", "keys", "nope")
    assert deleted.stdout.strip() == "cli: deleted 1 documents" and "not found: nope" in deleted.stderr
    assert cli("collections", "drop", *target, "cli").stdout.strip() == "deleted collection cli"
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "ok"}\nnot json\n')
    bad = cli("collections", "upsert", *target, "cli", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 2 and "bad.jsonl:2: not JSON" in bad.stderr
