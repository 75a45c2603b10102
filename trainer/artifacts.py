"""The finished adapter folder, exactly what `loraserve serve --adapter NAME=DIR` reads:

adapter_config.json, adapter_model.safetensors   PEFT's own files
tokenizer files                                  the tokenizer the adapter was trained with
loraserve.json                                   the prompt format (the server renders this adapter's requests so)
manifest.json                                    versions, base model and data identity, config, metrics, and the
                                                 sha256 of every other file; written last, so a folder with a
                                                 manifest is complete
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraserve import __version__
from loraserve.prompting import Message
from loraserve.storage import MANIFEST, sha256_file

SETTINGS = "loraserve.json"


def weights_digest(folder: Path) -> str:
    """One sha256 over a model folder's weight files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "loraserve": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def write_adapter(folder: Path, model: Any, tokenizer: Any, prompt_format: str, manifest: dict[str, Any]) -> Path:
    """Write the adapter folder through a staging folder, manifest last; replace any earlier one."""
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / SETTINGS).write_text(json.dumps({"prompt_format": prompt_format}, indent=1) + "\n")
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = manifest | {"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def verify(folder: Path) -> dict[str, Any]:
    """The folder's manifest, after checking every file it lists against its sha256."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, expected in manifest["files"].items():
        actual = sha256_file(folder / name)
        if actual != expected:
            raise ValueError(f"{folder / name}: sha256 {actual} does not match the manifest's {expected}")
    return manifest


def reload_check(
    folder: Path, load_base: Any, prompt_format: Any, question: tuple[Message, ...], max_new_tokens: int
) -> dict[str, str]:
    """Load the written adapter with PEFT onto a fresh base model and ask it one question."""
    from peft import PeftModel

    base, tokenizer = load_base()
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    text = prompt_format.render(question, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=prompt_format.adds_special_tokens)
    inputs = {k: v.to(base.device) for k, v in inputs.items()}
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return {"question": question[-1].content, "answer": answer}


def manifest_for(
    config: Any, base: dict[str, str], data: dict[str, Any], metrics: dict[str, Any], prompt_format: str
) -> dict[str, Any]:
    return {
        "kind": "loraserve-adapter",
        "run_id": f"{config.digest()[:12]}-{data['sha256'][:8]}",
        "versions": versions(),
        "base_model": base,
        "data": data,
        "prompt_format": prompt_format,
        "config": asdict(config),
        "metrics": metrics,
    }
