"""No-change rerun of `thumbcli generate --cache` against `find -printf` on the same tree.

    python bench/bench_rerun.py [--files 100000] [--folders 2000] [--repeat 5] [--workdir DIR]

Builds a tree of small JPEGs (one tiny image's bytes, copied), warms a cache once, then times
in the same run: `find TREE -type f -printf '%T@ %s\\n'` (walk plus one stat per file), a
plain Python scandir + stat walk, and the whole `thumbcli generate` no-change rerun
(interpreter start-up included). Prints medians and ratios against find.
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
import time
from pathlib import Path

import pyvips

# Bytecode as an installed package has it (pip compiles it): without this, a
# PYTHONDONTWRITEBYTECODE environment recompiles every changed module on every run.
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}

PY_WALK = """
import os, sys
def walk(path):
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path)
            else:
                entry.stat(follow_symlinks=False)
walk(sys.argv[1])
"""


def build_tree(root: Path, files: int, folders: int) -> None:
    marker = root / f".built-{files}-{folders}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    data = pyvips.Image.black(48, 32).draw_circle([200], 20, 16, 10, fill=True).jpegsave_buffer(Q=70)
    per_folder = -(-files // folders)
    for index in range(files):
        folder = root / f"d{index // per_folder // 50:03d}" / f"e{index // per_folder:05d}"
        if index % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{index:06d}.jpg").write_bytes(data)
    marker.touch()


def run_once(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def warm_up(python: str, tree: Path, cache: Path) -> list[str]:
    """Make `cache` for `tree` with `python -m thumbcli`, then rerun once so every folder signature is recorded."""
    thumbcli = [python, "-m", "thumbcli", "generate", str(tree), "--cache", str(cache), "-s", "64"]
    started = time.perf_counter()
    first = subprocess.run([*thumbcli, "--json", "--quiet"], capture_output=True, text=True, check=False, env=ENV)
    print(f"warm-up generate ({python}): {time.perf_counter() - started:.1f} s, exit {first.returncode}")
    if first.returncode not in (0, 1):
        raise SystemExit(first.stderr[-2000:])
    # A folder's signature is recorded once its thumbnails are verified and at least 2 s
    # old; until then a rerun lists its output folders. Let the warm-up's folders age.
    time.sleep(2.5)
    started = time.perf_counter()
    subprocess.run([*thumbcli, "--quiet"], check=True, env=ENV)
    print(f"first rerun (verifies folders, records their signatures): {time.perf_counter() - started:.2f} s")
    return thumbcli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench-rerun")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="also time `PYTHON -m thumbcli` (e.g. another install's interpreter) on its own cache of the same tree",
    )
    args = parser.parse_args()

    tree, cache = args.workdir / "tree", args.workdir / "cache"
    started = time.perf_counter()
    build_tree(tree, args.files, args.folders)
    print(f"tree: {args.files} files in {args.folders} folders under {tree} ({time.perf_counter() - started:.1f} s)")
    thumbcli = warm_up(sys.executable, tree, cache)
    compared = []
    for spec in args.compare:
        name, _, python = spec.partition("=")
        compared.append((f"{name} (no change)", [*warm_up(python, tree, args.workdir / f"cache-{name}"), "--json"]))

    rows = [
        ("find -printf '%T@ %s'", ["find", str(tree), "-type", "f", "-printf", "%T@ %s\\n"]),
        ("python scandir + stat", [sys.executable, "-c", PY_WALK, str(tree)]),
        ("thumbcli generate (no change)", [*thumbcli, "--json"]),
        ("  same, --walkers 1", [*thumbcli, "--json", "--walkers", "1"]),
        *compared,
    ]
    # Round-robin, so that the machine's slow moments fall on every row alike.
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(args.repeat):
        for label, argv in rows:
            seconds, output = run_once(argv)
            times[label].append(seconds)
            if "thumbcli" in argv[1:4]:
                summary = json.loads(output)
                if summary["made"] != 0 or summary["skipped"] != args.files or summary["bytes_read"] != 0:
                    raise SystemExit(f"{label}: not a no-change run: {summary}")
    print(f"thumbcli reruns: skipped {args.files} of {args.files}, made 0, read 0 bytes of sources")
    reference = statistics.median(times[rows[0][0]])
    print(f"\nmedian of {args.repeat} runs; ratio = time / find's time (lower is better)")
    print(f"{'':32} {'seconds':>8} {'ratio':>7} {'min':>8}")
    for label, _ in rows:
        median = statistics.median(times[label])
        print(f"{label:32} {median:8.3f} {median / reference:6.2f}x {min(times[label]):8.3f}")
    print("\ncommands:")
    for label, argv in rows:
        print(f"  {label}: {' '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
