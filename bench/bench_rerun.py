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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyvips

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


def timed(argv: list[str], repeat: int) -> tuple[float, str]:
    times = []
    output = ""
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        output = proc.stdout
    return statistics.median(times), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench-rerun")
    args = parser.parse_args()

    tree, cache = args.workdir / "tree", args.workdir / "cache"
    started = time.perf_counter()
    build_tree(tree, args.files, args.folders)
    print(f"tree: {args.files} files in {args.folders} folders under {tree} ({time.perf_counter() - started:.1f} s)")
    thumbcli = [sys.executable, "-m", "thumbcli", "generate", str(tree), "--cache", str(cache), "-s", "64"]
    started = time.perf_counter()
    first = subprocess.run([*thumbcli, "--json", "--quiet"], capture_output=True, text=True, check=False)
    print(f"warm-up generate: {time.perf_counter() - started:.1f} s, exit {first.returncode}")
    if first.returncode not in (0, 1):
        raise SystemExit(first.stderr[-2000:])

    rows = [
        ("find -printf '%T@ %s'", ["find", str(tree), "-type", "f", "-printf", "%T@ %s\\n"]),
        ("python scandir + stat", [sys.executable, "-c", PY_WALK, str(tree)]),
        ("thumbcli generate (no change)", [*thumbcli, "--json"]),
    ]
    results = []
    for label, argv in rows:
        seconds, output = timed(argv, args.repeat)
        results.append((label, seconds))
        if label.startswith("thumbcli"):
            summary = json.loads(output)
            assert summary["made"] == 0, summary
            skipped, made, read = summary["skipped"], summary["made"], summary["bytes_read"]
            print(f"  thumbcli rerun: skipped {skipped}, made {made}, read {read} B")
    reference = results[0][1]
    print(f"\nmedian of {args.repeat} runs; ratio = time / find's time (lower is better)")
    print(f"{'':32} {'seconds':>8} {'ratio':>7}")
    for label, seconds in results:
        print(f"{label:32} {seconds:8.3f} {seconds / reference:6.2f}x")
    print("\ncommands:")
    for label, argv in rows:
        print(f"  {label}: {' '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
