"""`thumbcli generate` with object storage against a local moto S3 server, side by side with its references.

    python bench/bench_s3.py [--objects 10000] [--images 200] [--repeat 3] [--latency-ms 50]
                             [--scenarios rerun,verify,camera,latency] [--verify-sizes 1]
                             [--workdir DIR]

Starts `moto_server` on 127.0.0.1 (the network is never left) and times, each command once
untimed first, the median of REPEAT interleaved runs:

* rerun: the no-change rerun over OBJECTS small objects (bucket -> local tree), against listing
  the same prefix with obstore alone in a fresh interpreter (target: <= 1.5x);
* verify: the same rerun into a bucket destination (-o s3://...), trusting the records and with
  --verify-destination (one more listing, of the thumbnails), against the same bare listing;
* camera: IMAGES camera JPEGs (bench/realphotos.py; drawn photos where apt-get cannot fetch them)
  bucket -> bucket against local disk -> local disk, one 256 thumbnail each: thumbcli's own CPU
  per image (its process tree from wait4: client, loaders, resample workers; not the server's)
  (target: <= 1.2x) and the wall-clock ratio;
* latency: the camera set bucket -> local tree through a relay that holds each request LATENCY
  ms, against the same relay without delay (target: throughput within 1.3x).

On 2 cores the server's own CPU (moto is Python) competes with the decode: wall-clock figures
are indicative, CPU per image is the figure to compare. Only ratios are printed as results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import run_measured
from photos import make_photo

PYTHON = sys.executable
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_REGION": "us-east-1",
    "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
}
BARE_LISTING = """
import sys, obstore
from obstore.store import S3Store
store = S3Store(sys.argv[1], client_options={"allow_http": True})
print(sum(len(chunk) for chunk in obstore.list(store, prefix=sys.argv[2] + "/", chunk_size=1000)))
"""


#: The moto server's process id, for the CPU it spends serving a run.
SERVER_PID: list[int] = []


def server_cpu() -> float:
    """CPU seconds (user + system) the moto server has used so far."""
    fields = Path(f"/proc/{SERVER_PID[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def moto_server(folder: Path) -> Iterator[int]:
    """moto's S3 server on a port it picks; yields the port."""
    log = folder / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [Path(PYTHON).parent / "moto_server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=out
        )
    SERVER_PID[:] = [server.pid]
    try:
        while not (found := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
            if server.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace"))
            time.sleep(0.05)
        yield int(found.group(1))
    finally:
        server.terminate()
        server.wait()


class DelayingRelay:
    """A TCP relay to the server that holds each request `delay` seconds before passing it on."""

    def __init__(self, upstream: int, delay: float) -> None:
        self._upstream, self._delay = upstream, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            for args in ((client, upstream, self._delay), (upstream, client, 0.0)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        last = 0.0
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                # A chunk after a pause begins a request (the client waited for the last answer).
                if delay and time.monotonic() - last > 0.005:
                    time.sleep(delay)
                last = time.monotonic()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting."""
        self._listener.close()


def s3_client(port: int) -> object:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def upload(port: int, bucket: str, files: list[tuple[str, bytes]]) -> None:
    """Store objects with a few threads (moto answers one request per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    client = s3_client(port)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), files))  # type: ignore[attr-defined]


def thumbcli(*args: str | Path) -> list[str]:
    return [PYTHON, "-m", "thumbcli", "generate", *map(str, args), "--quiet"]


def median_of(runs: dict[str, Callable[[], dict[str, float]]], repeat: int) -> dict[str, dict[str, float]]:
    """Each command once untimed, then REPEAT interleaved rounds; the median of each figure."""
    for run in runs.values():
        run()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            samples[name].append(run())
    return {
        name: {
            key: statistics.median(float(s[key]) for s in got) for key in ("wall", "cpu", "server_cpu") if key in got[0]
        }
        for name, got in samples.items()
    }


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def rerun_scenario(
    port: int, env: dict[str, str], work: Path, objects: int, repeat: int, verify: bool, verify_sizes: int = 1
) -> None:
    client = s3_client(port)
    client.create_bucket(Bucket="rerun")  # type: ignore[attr-defined]
    tiny: bytes = make_photo(16, 12, 0).jpegsave_buffer()
    upload(port, "rerun", [(f"lib/d{i % 100:03d}/img {i:05d}.jpg", tiny) for i in range(objects)])
    out = fresh(work / "rerun-out")
    first = run_measured(thumbcli("s3://rerun/lib", "-o", out, "-s", "8"), env)
    print(f"rerun: first run made {objects} in {first['wall']:.1f} s")
    runs = {
        "thumbcli rerun": lambda: run_measured(thumbcli("s3://rerun/lib", "-o", out, "-s", "8"), env),
        "obstore listing": lambda: run_measured([PYTHON, "-c", BARE_LISTING, "rerun", "lib"], env),
    }
    if verify:
        # The same rerun into a bucket destination, trusting the records and listing the destination.
        sizes = [arg for size in range(verify_sizes) for arg in ("-s", str(8 + size))]
        bucket_out = ("s3://rerun/thumbs", *sizes)
        first = run_measured(thumbcli("s3://rerun/lib", "-o", *bucket_out), env)
        print(f"verify: first run into the bucket made {objects * verify_sizes} in {first['wall']:.1f} s")
        runs["rerun into bucket"] = lambda: run_measured(thumbcli("s3://rerun/lib", "-o", *bucket_out), env)
        runs["... --verify-dest"] = lambda: run_measured(
            thumbcli("s3://rerun/lib", "-o", *bucket_out, "--verify-destination"), env
        )
    figures = median_of(runs, repeat)
    for name, got in figures.items():
        print(f"  {name:<18} wall {got['wall']:.3f} s  cpu {got['cpu']:.3f} s")
    listing = figures["obstore listing"]["wall"]
    ratio = figures["thumbcli rerun"]["wall"] / listing
    print(f"RESULT rerun over {objects} objects / bare listing: {ratio:.2f}x wall (target <= 1.5x)")
    if verify:
        trusting = figures["rerun into bucket"]["wall"] / listing
        verified = figures["... --verify-dest"]["wall"] / listing
        print(
            f"RESULT rerun into a bucket at {verify_sizes} size(s) / bare listing: {trusting:.2f}x wall; "
            f"with --verify-destination {verified:.2f}x (target <= 1.5x)"
        )


def camera_set(work: Path, count: int) -> list[Path]:
    """The camera JPEGs of bench/realphotos.py, or drawn photos where the wallpapers cannot be fetched."""
    from realphotos import camera_corpus, fetch_photos

    photos = fetch_photos(work)
    if photos:
        return sorted(camera_corpus(work, photos, count).glob("*.jpg"))
    print("(no apt-get: drawn photos instead of the real camera set)")
    folder = work / f"drawn-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:04d}.jpg" for i in range(count)]
    for seed, path in enumerate(paths):
        if not path.exists():
            make_photo(4000, 3000, seed).write_to_file(str(path), Q=90)
    return paths


def with_server_cpu(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """A measured run, with the CPU the server spent meanwhile (which competes with the decode on few cores)."""
    before = server_cpu()
    figures = run()
    figures["server_cpu"] = server_cpu() - before
    return figures


def camera_scenario(port: int, env: dict[str, str], work: Path, images: list[Path], repeat: int) -> None:
    client = s3_client(port)
    client.create_bucket(Bucket="camera")  # type: ignore[attr-defined]
    upload(port, "camera", [(f"lib/{path.name}", path.read_bytes()) for path in images])
    source = images[0].parent
    counter = iter(range(1_000_000))
    # Each run writes somewhere new: a fresh prefix (and state folder) or folder, so every run makes all.
    figures = median_of(
        {
            "local disk": lambda: run_measured(thumbcli(source, "-o", fresh(work / "local-out"), "-s", "256"), env),
            "bucket": lambda: with_server_cpu(
                lambda: run_measured(
                    thumbcli("s3://camera/lib", "-o", f"s3://camera/out-{next(counter)}", "-s", "256"), env
                )
            ),
        },
        repeat,
    )
    count = len(images)
    for name, got in figures.items():
        print(
            f"  {name:<12} wall {got['wall']:.2f} s ({count / got['wall']:.1f} img/s)  "
            f"cpu {1000 * got['cpu'] / count:.0f} ms/img"
        )
    print(f"  the server's own CPU during a bucket run: {1000 * figures['bucket']['server_cpu'] / count:.0f} ms/img")
    cpu = figures["bucket"]["cpu"] / figures["local disk"]["cpu"]
    wall = figures["bucket"]["wall"] / figures["local disk"]["wall"]
    print(f"RESULT {count} camera JPEGs bucket->bucket / disk->disk: cpu {cpu:.2f}x (target <= 1.2x), wall {wall:.2f}x")


def latency_scenario(port: int, env: dict[str, str], work: Path, count: int, latency: float, repeat: int) -> None:
    relays = {"no delay": DelayingRelay(port, 0.0), f"{latency * 1000:.0f} ms": DelayingRelay(port, latency)}
    runs = {}
    for name, relay in relays.items():
        relay_env = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{relay.port}")
        runs[name] = lambda relay_env=relay_env: run_measured(
            thumbcli("s3://camera/lib", "-o", fresh(work / "latency-out"), "-s", "256"), relay_env
        )
    figures = median_of(runs, repeat)
    for name, got in figures.items():
        print(f"  {name:<10} wall {got['wall']:.2f} s ({count / got['wall']:.1f} img/s)")
    names = list(figures)
    ratio = figures[names[1]]["wall"] / figures[names[0]]["wall"]
    print(f"RESULT throughput with {names[1]} per request / none: {ratio:.2f}x time (target <= 1.3x)")
    for relay in relays.values():
        relay.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--scenarios", default="rerun,camera,latency")
    ap.add_argument("--verify-sizes", type=int, default=1, help="thumbnail sizes of the verify scenario's bucket")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench")
    args = ap.parse_args()
    scenarios = set(args.scenarios.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="s3-", dir=args.workdir))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    try:
        with moto_server(work) as port:
            env = dict(FAKE_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", XDG_STATE_HOME=str(work / "state"))
            if scenarios & {"rerun", "verify"}:
                rerun_scenario(port, env, work, args.objects, args.repeat, "verify" in scenarios, args.verify_sizes)
            if scenarios & {"camera", "latency"}:
                images = camera_set(args.workdir, args.images)
                camera_scenario(port, env, work, images, args.repeat)
                if "latency" in scenarios:
                    latency_scenario(port, env, work, len(images), args.latency_ms / 1000, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
