"""Which S3 library for thumbcli: obstore, s3fs (fsspec) and boto3 side by side against a local moto server.

    pip install obstore s3fs boto3 'moto[server]'
    python bench/bench_s3_libraries.py [--objects 10000] [--repeat 3]

Times, median of REPEAT runs each: listing OBJECTS keys under one prefix (10 pages of 1,000),
GETs of 64 objects of 2 MB from 16 threads, and each library's import in a fresh interpreter.
The server is moto's, on 127.0.0.1: its own time is in every figure, so compare the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BUCKET = "libraries"


def median_seconds(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_seconds(module: str) -> float:
    """The fastest of three imports of `module` in a fresh interpreter."""
    script = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(
        float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout) for _ in range(3)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp()) / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", "0"], stderr=out
        )
    try:
        while not (found := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
            time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{found.group(1)}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
        )
        compare(endpoint, args.objects, args.repeat)
    finally:
        server.terminate()
        server.wait()
    for module in ("obstore", "boto3", "s3fs"):
        print(f"import {module:<8} {1000 * import_seconds(module):.0f} ms")


def compare(endpoint: str, objects: int, repeat: int) -> None:
    import boto3
    import obstore
    import s3fs
    from obstore.store import S3Store

    store = S3Store(BUCKET, client_options={"allow_http": True})
    client: Any = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)

    async def fill() -> None:
        limit = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with limit:
                await obstore.put_async(store, f"many/d{i % 100:03d}/img{i:05d}.jpg", b"x" * 100)

        await asyncio.gather(*(put(i) for i in range(objects)))

    asyncio.run(fill())
    big = os.urandom(2_000_000)
    keys = [f"big/{i}.jpg" for i in range(64)]
    for key in keys:
        obstore.put(store, key, big)
    files = s3fs.S3FileSystem(endpoint_url=endpoint)

    def boto3_list() -> int:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="many/")
        return sum(len(page.get("Contents", [])) for page in pages)

    def s3fs_list() -> int:
        files.invalidate_cache()
        return len(files.find(f"{BUCKET}/many/"))

    listings: dict[str, Callable[[], int]] = {
        "obstore": lambda: sum(len(chunk) for chunk in obstore.list(store, prefix="many/", chunk_size=1000)),
        "boto3": boto3_list,
        "s3fs": s3fs_list,
    }
    gets: dict[str, Callable[[str], int]] = {
        "obstore": lambda key: len(obstore.get(store, key).bytes()),
        "boto3": lambda key: len(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()),
        "s3fs": lambda key: len(files.cat_file(f"{BUCKET}/{key}")),
    }
    for name, listing in listings.items():
        assert listing() == objects
        print(f"list {objects} keys  {name:<8} {median_seconds(listing, repeat):.3f} s")
    for name, get in gets.items():

        def get_all(get: Callable[[str], int] = get) -> int:
            with ThreadPoolExecutor(16) as pool:
                return sum(pool.map(get, keys))

        seconds = median_seconds(get_all, repeat)
        print(f"GET 64 x 2 MB, 16 threads  {name:<8} {seconds:.3f} s  {len(keys) * len(big) / seconds / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
