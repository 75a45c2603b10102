"""One benchmark on two revisions of loraserve, side by side in one run: the working tree against a git revision
(default HEAD), alternating rounds so that drift on the machine falls on both. Each round runs bench/throughput.py (or
another script under bench/ that writes the same JSON) once per side, with the arguments after `--`.

The other revision runs from a temporary git worktree, imported ahead of the editable install through PYTHONPATH (the
server subprocess inherits it), so one virtualenv serves both sides.

    python bench/revisions.py --base HEAD --rounds 2 -- --levels 1 32 --no-peer --adapters 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("server", "client", "trainer")  # pyproject maps these folders into the loraserve package


def checkout(revision: str, scratch: Path) -> Path:
    """The revision as an importable `loraserve` package under scratch (returned: the folder to put on PYTHONPATH);
    its bench/ scripts are at scratch / "tree" / "bench"."""
    tree = scratch / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True)
    package = scratch / "path" / "loraserve"
    shutil.copytree(tree / "loraserve", package)
    for name in SUBPACKAGES:
        (package / name).symlink_to(tree / name)
    return scratch / "path"


def run_side(script: Path, out: Path, arguments: list[str], pythonpath: Path | None) -> list[dict]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(pythonpath)
    subprocess.run([sys.executable, str(script), *arguments, "--out", str(out)], check=True, env=env, cwd=ROOT)
    (result,) = out.glob("*.json")
    return [r for r in json.loads(result.read_text())["results"] if r["name"] == "server"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both sides once, alternating")
    parser.add_argument("--script", default="bench/throughput.py", help="the benchmark, relative to the repository")
    parser.add_argument("--out", type=Path, default=Path("bench/results/revisions.json"))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="-- then the benchmark's own arguments")
    args = parser.parse_args()
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores; cpu flags: {info['cpu_flags']}", flush=True)
    runs: dict[str, list[list[dict]]] = {"base": [], "working tree": []}
    with tempfile.TemporaryDirectory(prefix="loraserve-revisions-") as folder:
        scratch = Path(folder)
        base_path = checkout(args.base, scratch)
        try:
            for round_ in range(args.rounds):
                # alternate which side goes first, so neither always runs on a warmer machine
                sides = ["base", "working tree"] if round_ % 2 == 0 else ["working tree", "base"]
                for side in sides:
                    script = (scratch / "tree" if side == "base" else ROOT) / args.script
                    out = scratch / "out" / f"{side.replace(' ', '-')}-{round_}"
                    pythonpath = base_path if side == "base" else None
                    runs[side].append(run_side(script, out, arguments, pythonpath))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / "tree")], check=False
            )
    levels = sorted({r["concurrency"] for rounds in runs.values() for run in rounds for r in run})
    rows = []
    print(f"\n{'streams':>8} {'base tok/s':>16} {'working tree tok/s':>22} {'ratio':>7}")
    for level in levels:

        def rates(side: str, level: int = level) -> list[float]:
            return [r["tokens_per_second"] for run in runs[side] for r in run if r["concurrency"] == level]

        base, new = rates("base"), rates("working tree")
        ratio = statistics.median(new) / statistics.median(base)
        rows.append({"streams": level, "base": base, "working_tree": new, "ratio_of_medians": round(ratio, 3)})
        print(f"{level:>8} {', '.join(map(str, base)):>16} {', '.join(map(str, new)):>22} {ratio:>7.3f}")
    summary = {"machine": info, "base": args.base, "command": " ".join(sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
