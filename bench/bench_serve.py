"""Benchmark `thumbcli serve` against nginx with wrk, side by side, on 127.0.0.1 only.

Usage: python bench/bench_serve.py [--duration 5] [--workers 1 2] [--no-install]

Builds a cache of 1,000 photo-like 10-30 KB JPEGs and one 50 MB file, then for each
worker count runs wrk against nginx, alternating rounds, (sendfile on, access_log off) and thumbcli serve:
rotating small thumbnails, 304s for If-None-Match, and the 50 MB file. Prints req/s,
MB/s and the thumbcli/nginx ratios, then counts the send and read calls with strace (under strace
the server runs so slowly that every thumbnail's open file has expired by its next request, so
the opens' pread64 show up there, not in a real run).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_COUNT = 1000
BIG_BYTES = 50 * 1024 * 1024
TARGETS = {"small": 1.0, "304": 1.0, "50MB": 1.0}  # issue 22: at least level with nginx

WRK_ROTATE = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format(nil, paths[i])
end
"""

NGINX_CONF = """
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/jpeg jpg; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {root};
        add_header Cache-Control "public, max-age=86400";
    }}
}}
"""


def ensure_tools(install: bool) -> None:
    """Install wrk, nginx and strace with apt if they are missing and we may."""
    missing = [tool for tool in ("wrk", "nginx", "strace") if shutil.which(tool) is None]
    if missing and install and shutil.which("apt-get"):
        packages = {"wrk": "wrk", "nginx": "nginx-light", "strace": "strace"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300)
        wanted = [packages[tool] for tool in missing]
        if subprocess.run(["apt-get", "install", "-y", "-qq", *wanted], check=False, timeout=600).returncode:
            wanted = ["nginx" if name == "nginx-light" else name for name in wanted]
            subprocess.run(["apt-get", "install", "-y", "-qq", *wanted], check=False, timeout=600)


def build_cache(root: Path) -> list[str]:
    """A cache of noise JPEGs (10-30 KB) and one 50 MB file; returns the thumbnail relpaths."""
    import pyvips

    root.mkdir(parents=True)
    (root / "thumbcli-cache.json").write_text(
        '{"layout": 1, "presets": {"small": {"format": "jpeg"}, "big": {"format": "jpeg"}}}'
    )
    small = root / "v1" / "small"
    small.mkdir(parents=True)
    rng = random.Random(1)
    names = []
    for index in range(SMALL_COUNT):
        side = rng.randint(135, 235)
        image = pyvips.Image.gaussnoise(side, side, sigma=30, mean=128)
        image = image.bandjoin([image.flip("horizontal"), image.flip("vertical")]).cast("uchar")
        name = f"photo{index:04d}.jpg"
        image.jpegsave(str(small / f"{name}.jpg"), Q=85)
        names.append(name)
    big = root / "v1" / "big"
    big.mkdir(parents=True)
    block = os.urandom(1024 * 1024)
    with open(big / "huge.tif.jpg", "wb") as handle:
        for _ in range(BIG_BYTES // len(block)):
            handle.write(block)
    return names


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def etag_of(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while chunk := sock.recv(65536):
            head += chunk
    match = re.search(rb"(?im)^etag: *(.+?)\r$", head)
    if match is None:
        raise RuntimeError(f"no ETag from port {port}: {head!r}")
    return match.group(1).decode()


def run_wrk(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run wrk; return (requests/s, MB/s)."""
    result = subprocess.run(
        ["wrk", *args], capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})), check=True
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", result.stdout).groups()  # type: ignore[union-attr]
    scale = {"B": 1 / 1024 / 1024, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", result.stdout)
    if errors:
        print(f"    wrk reported: {errors.group(0)}")
    return rps, float(value) * scale


def scenarios(port: int, small_paths: list[str], big_path: str, workdir: Path, duration: str, tag: str) -> dict:
    paths_file = workdir / f"paths-{tag}.txt"
    paths_file.write_text("\n".join(small_paths) + "\n")
    script = workdir / "rotate.lua"
    script.write_text(WRK_ROTATE)
    url = f"http://127.0.0.1:{port}"
    base = ["-t2", "-c64", f"-d{duration}"]
    results = {}
    results["small"] = run_wrk([*base, "-s", str(script), url + "/"], env={"BENCH_PATHS": str(paths_file)})
    etag = etag_of(port, small_paths[0])
    results["304"] = run_wrk([*base, "-H", f"If-None-Match: {etag}", url + small_paths[0]])
    results["50MB"] = run_wrk(["-t2", "-c4", f"-d{duration}", "--timeout", "30s", url + big_path])
    return results


def start_thumbcli(cache: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "thumbcli", "serve", str(cache), "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return process


def keep_round(table: dict[str, dict], server: str, found: dict) -> None:
    """Keep every round's figures per scenario: the verdict is on their medians, with the spread shown."""
    rounds = table.setdefault(server, {})
    for scenario, figures in found.items():
        rounds.setdefault(scenario, []).append(figures)


def median_of(rounds: list[tuple[float, float]], index: int) -> float:
    return statistics.median(figures[index] for figures in rounds)


def start_nginx(root: Path, workdir: Path, port: int, workers: int, round_number: int) -> subprocess.Popen[bytes]:
    tmp = workdir / f"nginx-{workers}-{round_number}"
    tmp.mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port, root=root / "v1"))
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")])
    wait_for_port(port)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def count_sendfile(pid: int, port: int, script: Path, paths_file: Path) -> str:
    """Send and read calls made by one server process during a short wrk run, from strace -c."""
    trace = subprocess.Popen(
        ["strace", "-c", "-f", "-e", "trace=sendfile,sendto,sendmsg,recvfrom,read,pread64", "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    try:
        rps, _ = run_wrk(
            ["-t1", "-c8", "-d2s", "-s", str(script), f"http://127.0.0.1:{port}/"],
            env={"BENCH_PATHS": str(paths_file)},
        )
    finally:
        trace.send_signal(signal.SIGINT)
        _, report = trace.communicate(timeout=30)
    lines = [
        line
        for line in report.splitlines()
        if re.search(r"\b(sendfile|sendto|sendmsg|recvfrom|pread64|read)\s*$", line)
    ]
    return f"under strace ({rps:.0f} req/s):\n" + "\n".join("      " + line for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="5s", help="wrk duration per run (default 5s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    parser.add_argument("--rounds", type=int, default=5, help="alternate the servers this many times (medians)")
    parser.add_argument("--cache", type=Path, help="build the test cache here once and reuse it (default: a temp dir)")
    args = parser.parse_args()
    ensure_tools(install=not args.no_install)
    if shutil.which("wrk") is None:
        print("wrk is not installed: skipping the benchmark")
        return 0
    have_nginx = shutil.which("nginx") is not None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temporary:
        workdir = Path(temporary)
        workdir.chmod(0o755)  # nginx workers run as an unprivileged user
        cache = args.cache.resolve() if args.cache else workdir / "cache"
        started = time.monotonic()
        if (cache / "thumbcli-cache.json").exists():
            names = sorted(path.name[: -len(".jpg")] for path in (cache / "v1/small").iterdir())
        else:
            names = build_cache(cache)
        sizes = sorted((cache / "v1/small" / f"{n}.jpg").stat().st_size for n in names)
        print(
            f"cache: {len(names)} JPEGs {sizes[0] // 1024}-{sizes[-1] // 1024} KB "
            f"(median {sizes[len(sizes) // 2] // 1024} KB) + one 50 MB file, "
            f"built in {time.monotonic() - started:.1f} s"
        )
        print(f"host: {os.cpu_count()} CPUs; wrk -t2 -c64 (small, 304) / -c4 (50 MB), {args.duration} each")
        thumbcli_paths = [f"/small/{name}" for name in names]
        nginx_paths = [f"/small/{name}.jpg" for name in names]
        for workers in args.workers:
            print(f"\n== {workers} worker(s) ==")
            table: dict[str, dict] = {}
            for round_number in range(args.rounds):
                if have_nginx:
                    port = free_port()
                    nginx = start_nginx(cache, workdir, port, workers, round_number)
                    try:
                        found = scenarios(port, nginx_paths, "/big/huge.tif.jpg", workdir, args.duration, "n")
                    finally:
                        stop(nginx)
                    keep_round(table, "nginx", found)
                port = free_port()
                server = start_thumbcli(cache, port, workers)
                try:
                    found = scenarios(port, thumbcli_paths, "/big/huge.tif", workdir, args.duration, "t")
                    if workers == 1 and round_number == 0 and shutil.which("strace"):
                        syscalls = count_sendfile(server.pid, port, workdir / "rotate.lua", workdir / "paths-t.txt")
                        print("  thumbcli syscalls " + syscalls)
                finally:
                    stop(server)
                keep_round(table, "thumbcli", found)
            print(f"  {'scenario':<8} {'server':<9} {'req/s':>10} {'MB/s':>9}   rounds (median first)")
            for scenario in ("small", "304", "50MB"):
                index = 1 if scenario == "50MB" else 0
                for name, results in table.items():
                    rounds = results[scenario]
                    spread = " ".join(f"{figures[index]:.0f}" for figures in rounds)
                    rps, mbps = median_of(rounds, 0), median_of(rounds, 1)
                    print(f"  {scenario:<8} {name:<9} {rps:>10.0f} {mbps:>9.1f}   {spread}")
                if "nginx" in table:
                    ours, theirs = table["thumbcli"][scenario], table["nginx"][scenario]
                    ratio = (
                        median_of(ours, index) / median_of(theirs, index) if median_of(theirs, index) else float("nan")
                    )
                    paired = sorted(a[index] / b[index] for a, b in zip(ours, theirs, strict=True) if b[index])
                    measure = "MB/s" if scenario == "50MB" else "req/s"
                    verdict = "ok" if ratio >= TARGETS[scenario] else "below target"
                    print(
                        f"  {scenario:<8} ratio     {ratio:>10.2f}x {measure} of the medians; per round "
                        f"{paired[0]:.2f}-{paired[-1]:.2f}x (target {TARGETS[scenario]}x: {verdict})"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
