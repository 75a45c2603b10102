"""Everything about LoRA adapters on the model side, in one place:

- spec.py: ids, the --adapter NAME=PATH spec, and what ModelInfo reports of an adapter (no torch);
- sources.py: where LoadAdapter may read one from (--adapter-root, --adapter-buckets), never an arbitrary path;
- files.py: reading and checking a PEFT folder against the model (patterns.py bounds its regexes);
- banks.py: the resident adapters stacked per projection and applied to a batch.

Around them: the engine's residency and eviction (server/engine/adapter_registry.py), S3 push and pull
(loraserve/storage.py), and what the trainer writes (trainer/artifacts.py).
"""
