"""Benchmark gallery pages and format negotiation of `thumbcli serve`, on 127.0.0.1 only.

Usage: python bench/bench_browse.py [--duration 5s] [--rounds 2] [--reference ad15b67]

Builds a cache whose preset `small` holds 5,000 thumbnails in one folder, made in three
formats (the same small JPEG bytes in each variant's file, so only the server's work differs).
Then, in one run and alternating the servers round by round (keeping each one's best):

- today's server (the `--reference` commit, exported with `git archive`) serving the small
  thumbnails, which it sees as single-format JPEG (the manifest's fallback);
- this tree's server serving them with negotiation on (wrk sends a browser's Accept), and
  with `--browse`: time to first byte and size of the folder's gallery page, cold (first
  listing), made from the kept listing, and made less than a second ago; and wrk requests/s for page
  loads beside the thumbnails' own figure.
Prints the negotiated / reference ratio (target: within 10%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_serve import free_port, run_wrk, stop, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDER_COUNT = 5000
FOLDER = "/small/folder/"
BROWSER_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
WRK_ROTATE = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = math.random(#paths)
local accept = os.getenv("BENCH_ACCEPT")
local headers = {}
if accept ~= "" then headers["Accept"] = accept end
request = function()
  i = i % #paths + 1
  return wrk.format(nil, paths[i], headers)
end
"""


def build_cache(root: Path) -> list[str]:
    """5,000 small thumbnails in one folder, each as AVIF, WebP and JPEG files; returns their URL paths."""
    import pyvips

    image = pyvips.Image.gaussnoise(160, 120, sigma=30, mean=128).cast("uchar")
    data = bytes(image.bandjoin([image, image]).copy(interpretation="srgb").jpegsave_buffer(Q=80))
    folder = root / "v1" / "small" / "folder"
    folder.mkdir(parents=True)
    (root / "thumbcli-cache.json").write_text(
        '{"layout": 1, "presets": {"small": {"format": "jpeg", "formats": ["avif", "webp", "jpeg"], "size": "160"}}}'
    )
    paths = []
    for index in range(FOLDER_COUNT):
        name = f"photo{index:05d}.jpg"
        for suffix in ("avif", "webp", "jpg"):
            (folder / f"{name}.{suffix}").write_bytes(data)
        paths.append(f"{FOLDER}{name}")
    return paths


def export_reference(commit: str, into: Path) -> Path:
    """The thumbcli package as it was at `commit`, extracted under `into`."""
    archive = into / "reference.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "thumbcli"], stdout=handle, check=True)
    tree = into / "reference"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def start(tree: Path, cache: Path, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "thumbcli", "serve", str(cache), "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process, port


def first_byte(port: int, path: str) -> tuple[float, int]:
    """Seconds to the first byte of a response and its total size in bytes, on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        chunk = sock.recv(65536)
        waited = time.perf_counter() - started
        total = len(chunk)
        while chunk:
            chunk = sock.recv(65536)
            total += len(chunk)
    return waited, total


def wrk_rotating(port: int, paths_file: Path, script: Path, duration: str, accept: str) -> float:
    found = run_wrk(
        ["-t2", "-c64", f"-d{duration}", "-s", str(script), f"http://127.0.0.1:{port}/"],
        env={"BENCH_PATHS": str(paths_file), "BENCH_ACCEPT": accept},
    )
    return found[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="5s", help="wrk duration per run (default 5s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the servers this many times, keep the best")
    parser.add_argument("--reference", default="ad15b67", help="the commit whose server is today's (default ad15b67)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: skipping the benchmark")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-browse-") as temporary:
        workdir = Path(temporary)
        cache = workdir / "cache"
        paths = build_cache(cache)
        reference = export_reference(args.reference, workdir)
        paths_file = workdir / "paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        pages_file = workdir / "pages.txt"
        pages_file.write_text("".join(f"{FOLDER}?sort=name&page={page}\n" for page in range(1, 43)))
        script = workdir / "rotate.lua"
        script.write_text(WRK_ROTATE)
        print(f"cache: {FOLDER_COUNT} thumbnails in {FOLDER}, each in 3 formats; {os.cpu_count()} CPUs")
        print(f"wrk -t2 -c64, {args.duration} per run, best of {args.rounds} alternating rounds; 1 worker\n")
        best: dict[str, float] = {}
        pages: dict[str, list[float]] = {"cold": [], "made": [], "kept": []}
        page_bytes = 0
        for _round in range(args.rounds):
            server, port = start(reference, cache)
            try:
                rps = wrk_rotating(port, paths_file, script, args.duration, BROWSER_ACCEPT)
                best["reference"] = max(best.get("reference", 0.0), rps)
            finally:
                stop(server)
            server, port = start(REPO_ROOT, cache, "--browse")
            try:
                rps = wrk_rotating(port, paths_file, script, args.duration, BROWSER_ACCEPT)
                best["negotiated"] = max(best.get("negotiated", 0.0), rps)
                rps = wrk_rotating(port, paths_file, script, args.duration, "")
                best["fallback"] = max(best.get("fallback", 0.0), rps)
                cold, page_bytes = first_byte(port, FOLDER)
                pages["cold"].append(cold)
                # Pages 2-21 are each made once (the listing is kept); page 1 again is the page kept for a second.
                pages["made"] += [first_byte(port, f"{FOLDER}?page={page}")[0] for page in range(2, 22)]
                pages["kept"] += [first_byte(port, FOLDER)[0] for _ in range(20)]
                best["page 1"] = max(
                    best.get("page 1", 0.0),
                    run_wrk(["-t2", "-c64", f"-d{args.duration}", f"http://127.0.0.1:{port}{FOLDER}"])[0],
                )
                best["pages 1-42"] = max(
                    best.get("pages 1-42", 0.0), wrk_rotating(port, pages_file, script, args.duration, "")
                )
            finally:
                stop(server)
        print(f"  {'what':<44} {'req/s':>10}")
        print(f"  {'small thumbnails, today (' + args.reference + ')':<44} {best['reference']:>10.0f}")
        print(f"  {'small thumbnails, negotiated (browser Accept)':<44} {best['negotiated']:>10.0f}")
        print(f"  {'small thumbnails, no Accept (fallback JPEG)':<44} {best['fallback']:>10.0f}")
        print(f"  {'gallery page 1 of the 5,000-image folder':<44} {best['page 1']:>10.0f}")
        print(f"  {'gallery pages 1-42, rotating':<44} {best['pages 1-42']:>10.0f}")
        ratio = best["negotiated"] / best["reference"]
        verdict = "ok" if ratio >= 0.9 else "below target"
        print(f"\n  negotiated / today: {ratio:.2f}x (target >= 0.90x: {verdict})")
        cold, made, kept = (statistics.median(pages[key]) * 1000 for key in ("cold", "made", "kept"))
        print(f"  gallery page: {page_bytes} bytes; time to first byte: first listing of the folder {cold:.1f} ms,")
        print(f"  a page made from the kept listing {made:.2f} ms, a page made less than 1 s ago {kept:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
