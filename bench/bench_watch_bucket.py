"""What a `watch` rescan of a bucket source costs, side by side with a no-change `generate` rerun of it.

    python bench/bench_watch_bucket.py [--objects 10000] [--rescans 5] [--repeat 3]

Starts `moto_server` on 127.0.0.1, fills a prefix with OBJECTS small objects and makes them once.
Then, the median of REPEAT runs each: a no-change `generate` rerun (wall and CPU, its whole
process: interpreter start included) and a bare obstore listing of the prefix; and a `watch
--rescan 1s` on the same tree, after its catch-up: the wall time of each rescan's listing and
feed (its --debug line), the watch process's CPU per rescan (listing, planning by the records,
prune judged from the listing) over RESCANS rescans, and the requests each rescan made. The
server's own time is in every wall figure: compare the rows.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import run_measured
from bench_s3 import BARE_LISTING, FAKE_ENV, PYTHON, fresh, median_of, moto_server, s3_client, thumbcli, upload
from photos import make_photo

_RESCAN_LINE = re.compile(r"rescan: (\d+) objects listed and fed in ([0-9.]+) s")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rescans_in(metrics: Path) -> int:
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return 0
    found = re.search(r"^thumbcli_watch_rescans_total (\d+)", text, re.M)
    return int(found.group(1)) if found else 0


def watch_rescans(env: dict[str, str], out: Path, work: Path, rescans: int, log: Path) -> dict[str, float]:
    """A watch on the made tree: wall per rescan (median), CPU per rescan, requests per rescan."""
    metrics = work / "watch.prom"
    metrics.unlink(missing_ok=True)
    command = [PYTHON, "-m", "thumbcli", "watch", "s3://rerun/lib", "-o", str(out), "-s", "8"]
    command += ["--rescan", "1s", "--metrics-file", str(metrics), "--debug", "--quiet"]
    lines: list[str] = []
    watch = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert watch.stderr is not None
    stderr = watch.stderr
    reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while rescans_in(metrics) < 1:  # the first rescan ends after the catch-up and its prune
            if watch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("".join(lines[-20:]))
            time.sleep(0.05)
        first, cpu, requests = rescans_in(metrics), process_cpu(watch.pid), request_count(log)
        while rescans_in(metrics) < first + rescans:
            if watch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("".join(lines[-20:]))
            time.sleep(0.05)
        done = rescans_in(metrics) - first
        cpu, requests = process_cpu(watch.pid) - cpu, request_count(log) - requests
    finally:
        watch.terminate()
        watch.wait(60)
        reader.join(5)
    walls = [float(m.group(2)) for line in lines if (m := _RESCAN_LINE.search(line))]
    return {"wall": statistics.median(walls[1:] or walls), "cpu": cpu / done, "requests": requests / done}


def request_count(log: Path) -> int:
    """Requests moto logged so far (a rescan still running may add one)."""
    return len(re.findall(r'"(?:GET|PUT|HEAD|POST|DELETE) ', log.read_text(errors="replace")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--rescans", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-watch-bucket-"))
    with moto_server(work) as port:
        env = {**os.environ, **FAKE_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        env["XDG_STATE_HOME"] = str(work / "state")
        s3_client(port).create_bucket(Bucket="rerun")  # type: ignore[attr-defined]
        tiny: bytes = make_photo(16, 12, 0).jpegsave_buffer()
        upload(port, "rerun", [(f"lib/d{i % 100:03d}/img {i:05d}.jpg", tiny) for i in range(options.objects)])
        out = fresh(work / "out")
        made = run_measured(thumbcli("s3://rerun/lib", "-o", out, "-s", "8"), env)
        print(f"made {options.objects} objects' thumbnails in {made['wall']:.1f} s")
        figures = median_of(
            {
                "generate rerun": lambda: run_measured(thumbcli("s3://rerun/lib", "-o", out, "-s", "8"), env),
                "obstore listing": lambda: run_measured([PYTHON, "-c", BARE_LISTING, "rerun", "lib"], env),
            },
            options.repeat,
        )
        rescan = watch_rescans(env, out, work, options.rescans, work / "moto.log")
    for name, got in figures.items():
        print(f"  {name:<16} wall {got['wall']:.3f} s  cpu {got['cpu']:.3f} s")
    print(
        f"  watch rescan     wall {rescan['wall']:.3f} s  cpu {rescan['cpu']:.3f} s  "
        f"requests {rescan['requests']:.1f} a rescan (listing pages of 1,000)"
    )
    print(
        f"RESULT rescan / generate rerun over {options.objects} objects: "
        f"{rescan['wall'] / figures['generate rerun']['wall']:.2f}x wall, "
        f"{rescan['cpu'] / figures['generate rerun']['cpu']:.2f}x cpu; "
        f"rescan / bare listing {rescan['wall'] / figures['obstore listing']['wall']:.2f}x wall"
    )


if __name__ == "__main__":
    main()
