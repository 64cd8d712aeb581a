"""Times `thumbcli watch` against its targets (issue 23), side by side with a plain `generate` of the same files.

    python bench/bench_watch.py [--workdir DIR] [--arrivals 20] [--small 400] [--camera 40] [--rest 10]

* latency: one camera JPEG at a time renamed into an idle watcher's folder; from the rename to
  its thumbnail renamed into place (seen through inotify on the output folder, not polled):
  median and max over the arrivals (target: median <= 0.15 s, max <= 1 s), and whether each is
  byte-identical to what `generate` makes of the same file.
* burst: SMALL 320x240 images and CAMERA camera JPEGs copied file by file into a watched folder,
  to the last thumbnail, against `generate` of the same files in a fresh process (target <= 1.3x).
* at rest: CPU of the watch and its resample workers over REST seconds with 500 files watched
  and nothing changing, from /proc (target < 1% of a core).
* delete and rename: a file deleted until its thumbnail is gone (target <= 3 s); a folder of
  20 renamed until its thumbnails are all under the new name and none under the old (<= 5 s).

Corpora come from bench/realphotos.py (real photographs, cached in WORKDIR), or drawn ones
when apt-get cannot fetch them. The machine may be shared: figures are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

sys.path.insert(0, str(Path(__file__).parent))

TICKS = os.sysconf("SC_CLK_TCK")


def corpora(workdir: Path, camera: int, small: int) -> tuple[list[Path], list[Path]]:
    """Camera JPEGs and small images: real photographs when they can be fetched, drawn ones otherwise."""
    try:
        from realphotos import camera_corpus, fetch_photos, small_corpus

        photos = fetch_photos(workdir)
    except Exception as exc:  # no apt-get here: drawn photos instead
        print(f"# real photographs not available ({exc}): drawn ones", file=sys.stderr)
        photos = []
    if photos:
        cameras = sorted(camera_corpus(workdir, photos, camera).glob("*.jpg"))
        smalls = sorted(p for p in small_corpus(workdir, photos, small).iterdir() if not p.name.startswith("."))
        return cameras, smalls
    from photos import make_photo

    drawn = workdir / f"drawn-{camera}-{small}"
    (drawn / "camera").mkdir(parents=True, exist_ok=True)
    (drawn / "small").mkdir(parents=True, exist_ok=True)
    for index in range(camera):
        path = drawn / "camera" / f"photo_{index:04d}.jpg"
        if not path.exists():
            make_photo(4000, 3000, index).write_to_file(str(path), Q=90)
    for index in range(small):
        path = drawn / "small" / f"s_{index:05d}.jpg"
        if not path.exists():
            make_photo(320, 240, index).write_to_file(str(path), Q=85)
    return sorted((drawn / "camera").iterdir()), sorted((drawn / "small").iterdir())


def thumbcli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "thumbcli", *map(str, args)]


class Watch:
    """A `thumbcli watch --json` process, started and waited on until it has caught up."""

    def __init__(self, source: Path, out: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            thumbcli("watch", source, "-o", out, "--json", *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if json.loads(line)["event"] == "caught-up":
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def stop(self) -> float:
        """SIGTERM; the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return time.monotonic() - started

    def cpu_seconds(self) -> float:
        """User and system CPU of the watch and its children (the resample workers), so far."""
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    pids.append(int(entry))
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / TICKS


def wait_for_output(folder: Path, done: Callable[[], bool], timeout: float = 120.0) -> float:
    """Block on inotify events in `folder` until `done()`; the monotonic time it became true."""
    folder.mkdir(parents=True, exist_ok=True)
    with INotify() as inotify:
        inotify.add_watch(str(folder), flags.MOVED_TO | flags.CLOSE_WRITE | flags.DELETE | flags.CREATE)
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise TimeoutError(f"{folder}: not done within {timeout} s")
            inotify.read(timeout=100)
        return time.monotonic()


def latency(work: Path, cameras: list[Path], arrivals: int) -> dict[str, object]:
    source, out, staging = work / "lat-src", work / "lat-out", work / "lat-staging"
    for folder in (source, staging):
        folder.mkdir(parents=True)
    watch = Watch(source, out)
    seconds = []
    try:
        for index in range(arrivals):
            photo = cameras[index % len(cameras)]
            name = f"arrival_{index:03d}.jpg"
            shutil.copyfile(photo, staging / name)
            thumb = out / "256" / f"{name}.jpg"
            time.sleep(0.5)  # idle between arrivals
            started = time.monotonic()
            os.rename(staging / name, source / name)
            seconds.append(wait_for_output(out / "256", thumb.exists) - started)
    finally:
        stop = watch.stop()
    reference = work / "lat-reference"
    subprocess.run(thumbcli("generate", source, "-o", reference, "--quiet"), check=True)
    identical = sum(
        (out / "256" / f"{p.name}.jpg").read_bytes() == (reference / "256" / f"{p.name}.jpg").read_bytes()
        for p in source.iterdir()
    )
    return {
        "arrivals": arrivals,
        "median_s": round(statistics.median(seconds), 4),
        "max_s": round(max(seconds), 4),
        "first_s": round(seconds[0], 4),
        "byte_identical": f"{identical}/{arrivals}",
        "sigterm_exit_s": round(stop, 3),
    }


def burst(work: Path, cameras: list[Path], smalls: list[Path]) -> dict[str, object]:
    files = smalls + cameras
    source, out = work / "burst-src", work / "burst-out"
    (source / "incoming").mkdir(parents=True)
    watch = Watch(source, out)
    wanted = [out / "256" / "incoming" / f"{p.name}.jpg" for p in files]
    try:
        started = time.monotonic()
        for path in files:
            shutil.copyfile(path, source / "incoming" / path.name)
        copied = time.monotonic() - started
        finished = wait_for_output(out / "256" / "incoming", lambda: all(p.exists() for p in wanted), timeout=600)
        watch_seconds = finished - started
    finally:
        watch.stop()
    plain = work / "plain-src" / "incoming"
    plain.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, plain / path.name)
    started = time.monotonic()
    subprocess.run(thumbcli("generate", plain.parent, "-o", work / "plain-out", "--quiet"), check=True)
    generate_seconds = time.monotonic() - started
    return {
        "files": len(files),
        "copy_s": round(copied, 3),
        "watch_s": round(watch_seconds, 3),
        "generate_s": round(generate_seconds, 3),
        "ratio": round(watch_seconds / generate_seconds, 3),
    }


def at_rest(work: Path, smalls: list[Path], rest: float) -> dict[str, object]:
    source, out = work / "rest-src", work / "rest-out"
    for index in range(500):
        folder = source / f"f{index // 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(smalls[index % len(smalls)], folder / f"r{index:03d}{smalls[index % len(smalls)].suffix}")
    watch = Watch(source, out)
    try:
        time.sleep(2)  # the catch-up's last writes settle
        before, started = watch.cpu_seconds(), time.monotonic()
        time.sleep(rest)
        used, elapsed = watch.cpu_seconds() - before, time.monotonic() - started
        # Deletes and a folder rename, on the same watcher.
        victim = source / "f00" / "r000.jpg"
        thumb = out / "256" / "f00" / "r000.jpg.jpg"
        started = time.monotonic()
        victim.unlink()
        delete_s = wait_for_output(out / "256" / "f00", lambda: not thumb.exists()) - started
        old = out / "256" / "f01"
        names = [f"{p.name}.jpg" for p in (source / "f01").iterdir()]
        started = time.monotonic()
        (source / "f01").rename(source / "f01-renamed")
        new = out / "256" / "f01-renamed"

        def moved() -> bool:
            return not old.exists() and all((new / name).exists() for name in names)

        rename_s = wait_for_output(out / "256", moved) - started
    finally:
        watch.stop()
    return {
        "files": 500,
        "seconds": round(elapsed, 1),
        "cpu_percent_of_a_core": round(100 * used / elapsed, 3),
        "delete_s": round(delete_s, 3),
        "folder_rename_s": round(rename_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thumbcli-bench"))
    parser.add_argument("--arrivals", type=int, default=20)
    parser.add_argument("--small", type=int, default=400)
    parser.add_argument("--camera", type=int, default=40)
    parser.add_argument("--rest", type=float, default=10.0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cameras, smalls = corpora(args.workdir, args.camera, args.small)
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        work = Path(scratch)
        results = {
            "latency": latency(work, cameras, args.arrivals),
            "burst": burst(work, cameras[: args.camera], smalls[: args.small]),
            "at_rest": at_rest(work, smalls, args.rest),
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
