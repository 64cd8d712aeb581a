#!/usr/bin/env python3
"""Benchmark `thumbcli generate` against reference thumbnailers on camera-size JPEGs.

    python bench/bench_generate.py [--images 100] [--workdir DIR] [--install]
                                   [--repeat 3] [--scenarios a,b,c] [--sweep]
                                   [--thumbcli "CMD ..."] [--compare NAME=CMD ...] [--only-thumbcli]

What it does, all locally and bounded (every command has a timeout):

1. Makes --images camera JPEGs (Q90) cut from real photographs, 8 to 24 megapixels with EXIF and ICC
   (--corpus real, bench/realphotos.py), or photo-like drawn 4000x3000 ones (--corpus drawn: Q90,
   ~3 MB: blurred gradient, shapes, low-frequency texture and fine sensor-like noise) in
   WORKDIR/corpus-N-4000x3000-q90, cached between runs (a `.done` marker
   records the parameters).
2. With --install: `apt-get update && apt-get install -y libvips-tools` (for
   vipsthumbnail) and `pip install Pillow` into this interpreter.  Without it,
   missing references are skipped with a note.
3. Times, per scenario, with the median of --repeat runs (runs interleaved):
     thumbcli        `thumbcli generate SRC -o FRESH_OUT -s ... --json --quiet`
     pyvips-naive    one process, one libvips thread, a sequential loop of
                     pyvips.Image.thumbnail(path, 256).write_to_file(out.jpg)
     vips-xargs      find SRC -name '*.jpg' -print0 | xargs -0 -P CORES -n 50
                     vipsthumbnail -s 256 -o OUT/%s.jpg
     pillow-pool     multiprocessing.Pool(CORES): Image.open, draft('RGB', box),
                     thumbnail(box), save JPEG q80
     jpeg-floor      (a only) multiprocessing.Pool(CORES): libjpeg-turbo's scaled decode
                     alone (simplejpeg, min 256x256), nothing resized or written: the
                     floor for "CPU per image" (issue 22)
   Reported: wall seconds, source images/s, CPU seconds (user+sys of the whole
   process tree, from os.wait4 on the child, which includes every descendant
   it reaped); and the peak RSS of its largest single process (VmHWM) and the
   peak of the whole tree's summed PSS (parent, fork server and resample
   workers; a page they share counted once), sampled from /proc every 20 ms in
   one more, untimed run of each tool (sampling slows what it samples by 13-18%
   on 2 cores), and in every run of scenario c, which measures memory alone.
4. Scenarios:
     a  one size (256)
     b  three sizes 128/256/512: thumbcli in one run; vipsthumbnail in three
        passes; Pillow three thumbnails from one open/draft
     c  memory: thumbcli on the corpus and on a 4x corpus (hardlinks under
        other names: thumbcli does not follow symlinks) -> peak tree memory (PSS) ratio
     d  --small images of 320x240 (half JPEG Q85, half PNG), one size 256:
        where per-file overheads (transport, GIL) show
     e  hostile: 200 of d's small images and 20 PNGs that each outlast
        --max-decode-time (0.05 s here), so each kills its worker: what
        replacing a worker costs (vipsthumbnail, with no such limit, decodes them)
   Each --compare NAME=CMD variant gets a `vs NAME` ratio column (images/s).
   --sweep adds thumbcli variants (-j, --loaders) to scenario a.
5. The page cache cannot be dropped without root games, so every file is read
   once and each command runs once untimed before timing: all runs see a warm
   cache.

The exact command lines are printed.  Results are also written to
WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import realphotos

WIDTH, HEIGHT, QUALITY = 4000, 3000, 90
TIMEOUT = 900  # seconds; no single command may run longer
EXT4_RECENTLY_DELETED = 310  # seconds (see measure)
HERE = Path(__file__).resolve().parent


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def say(text: str = "") -> None:
    print(text, flush=True)


# -- install -------------------------------------------------------------------------------------


def install() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if shutil.which("vipsthumbnail") is None:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "libvips-tools"]):
            say(f"$ {shlex.join(cmd)}")
            subprocess.run(cmd, env=env, check=False, timeout=TIMEOUT, stdout=subprocess.DEVNULL)
    try:
        import PIL  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "Pillow"]
        say(f"$ {shlex.join(cmd)}")
        subprocess.run(cmd, check=False, timeout=TIMEOUT)


def have_pillow() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import PIL"], capture_output=True, timeout=60)
    return probe.returncode == 0


# -- corpus --------------------------------------------------------------------------------------

_GEN_SCRIPT = r"""
import os, random, sys
os.environ["VIPS_CONCURRENCY"] = "1"
import pyvips
W, H, Q = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def make(path, seed):
    rnd = random.Random(seed)
    xy = pyvips.Image.xyz(W, H)
    chans = [xy[0] * rnd.uniform(-.04, .04) + xy[1] * rnd.uniform(-.04, .04) + rnd.uniform(60, 190) for _ in range(3)]
    img = chans[0].bandjoin(chans[1:])
    img += pyvips.Image.gaussnoise(W // 16, H // 16, sigma=40, mean=0, seed=seed).resize(16, kernel="linear")
    img += pyvips.Image.gaussnoise(W // 4, H // 4, sigma=14, mean=0, seed=seed + 1).resize(4, kernel="linear")
    shapes = pyvips.Image.black(W, H, bands=3)
    for _ in range(12):
        shapes = shapes.draw_circle([rnd.uniform(-60, 60) for _ in range(3)], rnd.randrange(W), rnd.randrange(H),
                                    rnd.randrange(80, 700), fill=True)
    img += shapes.gaussblur(6)
    img += pyvips.Image.gaussnoise(W, H, sigma=3, mean=0, seed=seed + 2)
    img.cast("uchar").jpegsave(path + ".part", Q=Q)
    os.replace(path + ".part", path)
for line in sys.stdin:
    path, seed = line.split()
    make(path, int(seed))
"""


def make_corpus(workdir: Path, count: int) -> Path:
    corpus = workdir / f"corpus-{count}-{WIDTH}x{HEIGHT}-q{QUALITY}"
    marker = corpus / ".done"
    params = {"count": count, "width": WIDTH, "height": HEIGHT, "quality": QUALITY, "version": 2}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    todo = [(corpus / f"img_{i:04d}.jpg", 1000 + 7 * i) for i in range(count)]
    todo = [(p, s) for p, s in todo if not p.exists()]
    say(f"making {len(todo)} {WIDTH}x{HEIGHT} JPEGs (Q{QUALITY}) in {corpus} with {cores()} processes ...")
    started = time.monotonic()
    procs = []
    for k in range(cores()):
        part = todo[k :: cores()]
        if not part:
            continue
        proc = subprocess.Popen(
            [sys.executable, "-c", _GEN_SCRIPT, str(WIDTH), str(HEIGHT), str(QUALITY)], stdin=subprocess.PIPE, text=True
        )
        assert proc.stdin is not None
        proc.stdin.write("".join(f"{p} {s}\n" for p, s in part))
        proc.stdin.close()
        procs.append(proc)
    for proc in procs:
        if proc.wait(timeout=TIMEOUT) != 0:
            sys.exit("corpus generation failed")
    marker.write_text(json.dumps(params))
    sizes = [p.stat().st_size for p in corpus.glob("*.jpg")]
    say(
        f"  done in {time.monotonic() - started:.0f} s: {len(sizes)} files, "
        f"{statistics.mean(sizes) / 1e6:.2f} MB mean ({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f})"
    )
    return corpus


def make_big_corpus(workdir: Path, corpus: Path, factor: int = 4) -> Path:
    """`factor` hardlinks of every corpus file under different names (regular files, same inodes)."""
    big = workdir / f"{corpus.name}-x{factor}"
    files = sorted(corpus.glob("*.jpg"))
    big.mkdir(exist_ok=True)
    for k in range(factor):
        for f in files:
            link = big / f"c{k}_{f.name}"
            if not link.exists():
                os.link(f, link)
    return big


#: Scenario e: small images made, and slow PNGs that each outlast the decode time limit.
HOSTILE_FINE, HOSTILE_SLOW = 200, 20
HOSTILE_DECODE_SECONDS = 0.05


def make_hostile_corpus(workdir: Path, small: Path) -> Path:
    """HOSTILE_FINE of `small`'s images and HOSTILE_SLOW links to a PNG that decodes in about 0.3 s (hardlinks).

    A drawn 4000x4000 PNG (paeth filter, few MB): over HOSTILE_DECODE_SECONDS, its worker is
    killed and replaced, as a decompression bomb's is past the memory ceiling.
    """
    hostile = workdir / f"hostile-{HOSTILE_FINE}-{HOSTILE_SLOW}"
    hostile.mkdir(exist_ok=True)
    slow = workdir / "slow-4000.png"
    if not slow.exists():
        import pyvips

        xy = pyvips.Image.xyz(4000, 4000)
        a = ((xy[0] * xy[1]) & 255).cast("uchar")
        b = ((xy[0] * 3 + xy[1] * 5) & 255).cast("uchar")
        a.bandjoin([b, a ^ b]).copy(interpretation="srgb").pngsave(str(slow), compression=6, filter="paeth")
    for f in sorted(small.glob("*.jpg"))[:HOSTILE_FINE]:
        if not (hostile / f.name).exists():
            os.link(f, hostile / f.name)
    for k in range(HOSTILE_SLOW):
        if not (hostile / f"slow{k:02d}.png").exists():
            os.link(slow, hostile / f"slow{k:02d}.png")
    return hostile


def warm(paths: list[Path]) -> None:
    for d in paths:
        for f in [*d.glob("*.jpg"), *d.glob("*.png")]:
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass


# -- commands ------------------------------------------------------------------------------------

_SMALL_SCRIPT = r"""
import os, random, sys
os.environ["VIPS_CONCURRENCY"] = "1"
import pyvips
W, H = 320, 240
for line in sys.stdin:
    path, seed = line.split()
    rnd = random.Random(int(seed))
    xy = pyvips.Image.xyz(W, H)
    img = (xy[0] * rnd.uniform(0.2, 0.6) + rnd.uniform(0, 90)).bandjoin(
        [xy[1] * rnd.uniform(0.2, 0.8) + rnd.uniform(0, 60), (xy[0] + xy[1]) * rnd.uniform(0.1, 0.4)])
    img += pyvips.Image.gaussnoise(W, H, sigma=12, mean=0, seed=int(seed))
    img = img.cast("uchar")
    if path.endswith(".png"):
        img.pngsave(path + ".part", compression=6)
    else:
        img.jpegsave(path + ".part", Q=85)
    os.replace(path + ".part", path)
"""


def make_small_corpus(workdir: Path, count: int) -> Path:
    """`count` 320x240 images, every other one a PNG."""
    corpus = workdir / f"small-{count}-320x240"
    marker = corpus / ".done"
    if marker.exists():
        return corpus
    corpus.mkdir(parents=True, exist_ok=True)
    todo = [(corpus / f"s_{i:05d}.{'png' if i % 2 else 'jpg'}", 5000 + i) for i in range(count)]
    say(f"making {count} 320x240 images (JPEG and PNG) in {corpus} ...")
    procs = []
    for k in range(cores()):
        proc = subprocess.Popen([sys.executable, "-c", _SMALL_SCRIPT], stdin=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write("".join(f"{p} {s}\n" for p, s in todo[k :: cores()]))
        proc.stdin.close()
        procs.append(proc)
    for proc in procs:
        if proc.wait(timeout=TIMEOUT) != 0:
            sys.exit("corpus generation failed")
    marker.write_text("{}")
    return corpus


_NAIVE_SCRIPT = r"""
import os, sys
os.environ["VIPS_CONCURRENCY"] = "1"
import pyvips
pyvips.concurrency_set(1)
src, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name in sorted(os.listdir(src)):
    if name.endswith(".jpg"):
        pyvips.Image.thumbnail(os.path.join(src, name), size).write_to_file(os.path.join(out, name[:-4] + ".jpg"))
"""

#: The floor the issue names: libjpeg-turbo's scaled decode alone (simplejpeg, the decoder thumbcli
#: uses), at the smallest DCT scale that still covers the size, in a process pool; nothing written.
_FLOOR_SCRIPT = r"""
import os, sys
from multiprocessing import Pool
import simplejpeg
src, procs, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def one(name):
    with open(os.path.join(src, name), "rb") as handle:
        simplejpeg.decode_jpeg(handle.read(), colorspace="RGB", min_width=size, min_height=size)
if __name__ == "__main__":
    names = sorted(n for n in os.listdir(src) if n.endswith(".jpg"))
    with Pool(procs) as pool:
        for _ in pool.imap_unordered(one, names, chunksize=4):
            pass
"""

_PILLOW_SCRIPT = r"""
import os, sys
from multiprocessing import Pool
from PIL import Image
src, out, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sizes = sorted((int(s) for s in sys.argv[4].split(",")), reverse=True)
def one(name):
    with Image.open(os.path.join(src, name)) as im:
        im.draft("RGB", (sizes[0], sizes[0]))
        im = im.convert("RGB")
        for size in sizes:
            thumb = im.copy() if len(sizes) > 1 else im
            thumb.thumbnail((size, size))
            thumb.save(os.path.join(out, str(size), name[:-4] + ".jpg"), quality=80)
if __name__ == "__main__":
    for size in sizes:
        os.makedirs(os.path.join(out, str(size)), exist_ok=True)
    names = sorted(n for n in os.listdir(src) if n.endswith(".jpg"))
    with Pool(procs) as pool:
        for _ in pool.imap_unordered(one, names, chunksize=4):
            pass
"""


@dataclass
class Tool:
    """One benchmarked command: `argv(out_dir)` gives the argv (or a shell line)."""

    name: str
    scenario: str
    argv: object  # Callable[[Path], list[str] | str]
    expect: int  # thumbnails expected in the output tree
    images: int  # source images per run
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)
    #: The exit code a run must end with (thumbcli's 1: some files failed, in scenario e).
    exit_code: int = 0
    #: Memory is what it is run for (scenario c): every round samples it, and its wall time is only shown.
    memory: bool = False
    #: Its untimed run that sampled memory, for the others.
    memory_runs: list[dict[str, float]] = field(default_factory=list)

    def memory_mb(self, key: str) -> float:
        """The median of `key` ("tree_mb" or "rss_mb") over its runs that sampled memory."""
        return statistics.median(run[key] for run in self.runs + self.memory_runs if key in run)

    def command(self, out: Path) -> list[str] | str:
        return self.argv(out)  # type: ignore[operator]


def tree_memory(root: int) -> tuple[int, int]:
    """The memory of `root` and all its descendants now: their summed PSS and the largest one's peak RSS (bytes).

    PSS counts each shared page once: summed RSS would count a page each process shares (a
    fork's copy-on-write libraries, the read-only pages of one library) once per process that
    maps it. The peak RSS is each process's own high-water mark (VmHWM) since it started its
    program: wait4's ru_maxrss is not, as a child started by vfork takes its parent's (this
    benchmark's) peak with it through exec.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(_kib(f"/proc/{pid}/smaps_rollup", b"Pss:") for pid in tree), max(
        _kib(f"/proc/{pid}/status", b"VmHWM:") for pid in tree
    )


def _kib(path: str, field: bytes) -> int:
    """The `field` line of a /proc file, in bytes; 0 when the process has gone."""
    try:
        with open(path, "rb") as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(
    cmd: list[str] | str, env: dict[str, str], exit_code: int = 0, *, sample_memory: bool = False
) -> dict[str, float]:
    """Run cmd, which must end with `exit_code`; wall and CPU (user+sys) of its process tree, via wait4.

    With `sample_memory`, also the peak of the tree's summed PSS (`tree_mb`) and of its largest
    process's RSS (`rss_mb`), read from /proc every 20 ms. Never in a timed run: each sample
    reads /proc for every process on the machine and walks the mappings of each one in the tree
    (under its mmap lock). On 2 cores, sampling slowed the Pillow pool by 13% and thumbcli, whose
    tree has more processes, by 18%.
    """
    full_env = dict(os.environ, **env)
    shell = isinstance(cmd, str)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd if not shell else ["/bin/sh", "-c", cmd],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Drain pipes in a helper so a chatty child cannot block; then reap with wait4 for rusage.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        import threading

        def pump(src: object, dst: object) -> None:
            shutil.copyfileobj(src, dst)  # type: ignore[arg-type]

        pumps = [
            threading.Thread(target=pump, args=(proc.stdout, out_f)),
            threading.Thread(target=pump, args=(proc.stderr, err_f)),
        ]
        for t in pumps:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        tree_peak = largest_peak = 0
        # Its end wakes the poll at once: the wall time is not rounded up to a polling step.
        ended = select.poll()
        pidfd = os.pidfd_open(proc.pid)
        ended.register(pidfd, select.POLLIN)
        try:
            while not ended.poll(20 if sample_memory else 1000):
                if time.monotonic() > deadline:
                    proc.kill()
                if sample_memory:
                    tree_now, largest_now = tree_memory(proc.pid)
                    tree_peak, largest_peak = max(tree_peak, tree_now), max(largest_peak, largest_now)
        finally:
            os.close(pidfd)
        wall = time.perf_counter() - started
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        for t in pumps:
            t.join()
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    if proc.returncode != exit_code:
        raise RuntimeError(f"command failed ({proc.returncode}): {cmd}\n{stderr[-2000:]}")
    result = {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "stdout": stdout,  # type: ignore[dict-item]
    }
    if sample_memory:
        result["tree_mb"] = tree_peak / (1 << 20)
        result["rss_mb"] = largest_peak / (1 << 20)
    return result


def count_outputs(out: Path) -> int:
    return sum(1 for p in out.rglob("*") if p.is_file() and p.suffix == ".jpg")


def show(cmd: list[str] | str, env: dict[str, str]) -> str:
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    return prefix + (cmd if isinstance(cmd, str) else shlex.join(cmd))


def measure(tools: list[Tool], workdir: Path, repeat: int) -> None:
    """Run every tool once untimed, then REPEAT rounds of all of them, each into a fresh folder.

    The outputs are removed at the end, not after each run, and a benchmark starts at least
    5 minutes after the last one's cleanup: ext4 passes over the inodes deleted in the last 5
    minutes when it allocates one while the inode table is dirty (find_inode_bit ->
    recently_deleted), and a run right after 2,000 thumbnails were removed spent 39% of its
    main process's CPU there (perf), a cost of the benchmark's cleanup rather than of the tool.
    """
    outroot = workdir / "out"
    cleaned = workdir / "out.cleaned"  # when the last run's outputs were removed
    if outroot.exists():  # left by an interrupted run
        shutil.rmtree(outroot, ignore_errors=True)
        cleaned.write_text(str(time.time()))
    with contextlib.suppress(OSError, ValueError):
        wait = float(cleaned.read_text()) + EXT4_RECENTLY_DELETED - time.time()
        if wait > 0:
            say(f"waiting {wait:.0f} s: the last benchmark's outputs were removed less than 5 minutes ago")
            time.sleep(wait)
    outroot.mkdir(parents=True)
    try:
        _measure_rounds(tools, outroot, repeat)
    finally:
        shutil.rmtree(outroot, ignore_errors=True)
        cleaned.write_text(str(time.time()))


def _measure_rounds(tools: list[Tool], outroot: Path, repeat: int) -> None:
    def once(tool: Tool, label: str, *, sample_memory: bool = False) -> dict[str, float]:
        out = outroot / f"{tool.scenario}-{tool.name}-{label}".replace("/", "_").replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        cmd = tool.command(out)
        result = run_measured(cmd, tool.env, tool.exit_code, sample_memory=sample_memory)
        made = count_outputs(out)
        if made != tool.expect:
            raise RuntimeError(f"{tool.name}: expected {tool.expect} thumbnails, found {made} in {out}")
        return result

    for tool in list(tools):
        say(f"  [{tool.scenario}] {tool.name}:\n    $ {show(tool.command(outroot / 'OUT'), tool.env)}")
        try:
            once(tool, "warmup")  # untimed: warms page cache, binaries, pyc files
        except RuntimeError as exc:
            say(f"  SKIPPED {tool.name}: {str(exc)[-600:]}")
            tools.remove(tool)
    for rep in range(repeat):
        for tool in tools:
            r = once(tool, f"r{rep}", sample_memory=tool.memory)
            r.pop("stdout", None)
            tool.runs.append(r)
        say(f"  repetition {rep + 1}/{repeat} done")
    for tool in tools:
        if not tool.memory:
            r = once(tool, "memory", sample_memory=True)
            r.pop("stdout", None)
            tool.memory_runs.append(r)
    say("  memory sampled (one untimed run each)")


def med(tool: Tool, key: str) -> float:
    return statistics.median(r[key] for r in tool.runs)


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--small", type=int, default=2000, help="images of 320x240 in scenario d")
    ap.add_argument(
        "--corpus",
        choices=("real", "drawn"),
        default="real",
        help="real: cut from the photographs in Debian's plasma-workspace-wallpapers (bench/realphotos.py; "
        "drawn when it cannot be fetched); drawn: photo-like images pyvips draws",
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thumbcli-bench")
    ap.add_argument("--install", action="store_true", help="apt-get install libvips-tools; pip install Pillow")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--scenarios",
        default="a,b,c,d",
        help="comma list of a (one size), b (three sizes), c (memory), d (small images), e (hostile: workers killed)",
    )
    ap.add_argument("--sweep", action="store_true", help="also time thumbcli -j 1/3/4 and --loaders 1/4 in scenario a")
    ap.add_argument(
        "--thumbcli",
        default=None,
        help="command that runs thumbcli (default: the thumbcli next to this interpreter, "
        "else `python -m thumbcli`); e.g. 'env PYTHONPATH=/scratch python -m thumbcli'",
    )
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="another thumbcli command timed next to the default in scenarios a and b (repeatable), "
        "e.g. 'patched=env PYTHONPATH=/scratch/copy python -m thumbcli'",
    )
    ap.add_argument("--extra", default="", help="extra thumbcli arguments for every thumbcli run")
    ap.add_argument(
        "--only-thumbcli",
        action="store_true",
        help="time only thumbcli and the --compare variants (no pyvips-naive, vips-xargs, Pillow): "
        "more repetitions of the ratios that matter in the same time on a loaded machine",
    )
    args = ap.parse_args()

    n = cores()
    say(f"machine: {n} cores, python {sys.version.split()[0]} ({sys.executable})")
    if args.install:
        install()
    vipsthumbnail = shutil.which("vipsthumbnail") if not args.only_thumbcli else None
    pillow = have_pillow() and not args.only_thumbcli
    if args.only_thumbcli:
        say("only thumbcli and its --compare variants are timed")
    elif vipsthumbnail is None:
        say("NOTE: vipsthumbnail not found: skipping the vips-xargs reference (use --install)")
    else:
        ver = subprocess.run([vipsthumbnail, "--vips-version"], capture_output=True, text=True).stdout.strip()
        say(f"vipsthumbnail: {vipsthumbnail} ({ver})")
    if not pillow and not args.only_thumbcli:
        say("NOTE: Pillow not importable: skipping the pillow-pool reference (use --install)")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pyvips; print(pyvips.__version__, pyvips.version(0), pyvips.version(1), pyvips.version(2))",
        ],
        capture_output=True,
        text=True,
    )
    say(f"pyvips / libvips (for thumbcli and pyvips-naive): {probe.stdout.strip()}")
    # Figures with and without it do not compare: a machine without libjemalloc2 spent 8% more
    # CPU in the workers of scenario d (13.1 against 12.0 s, to tmpfs).
    probe = subprocess.run(
        [sys.executable, "-c", "from thumbcli.workerspawn import jemalloc_library; print(jemalloc_library() or '')"],
        capture_output=True,
        text=True,
    )
    allocator = probe.stdout.strip() or "glibc malloc (apt-get install libjemalloc2)"
    if probe.returncode:
        allocator = f"unknown: thumbcli is not importable by {sys.executable}"
    say(f"thumbcli workers allocate with: {allocator}")

    if args.thumbcli:
        thumbcli = shlex.split(args.thumbcli)
    else:
        exe = Path(sys.executable).with_name("thumbcli")
        thumbcli = [str(exe)] if exe.exists() else [sys.executable, "-m", "thumbcli"]
    extra = shlex.split(args.extra)

    args.workdir.mkdir(parents=True, exist_ok=True)
    scenarios = set(args.scenarios.split(","))
    photos = realphotos.fetch_photos(args.workdir) if args.corpus == "real" else []
    if args.corpus == "real" and not photos:
        say(f"NOTE: could not fetch {realphotos.PACKAGE}: using drawn images")
    if photos:
        say(f"sources cut from {len(photos)} photographs of {realphotos.PACKAGE} (bench/realphotos.py)")
        corpus = realphotos.camera_corpus(args.workdir, photos, args.images)
        small = realphotos.small_corpus(args.workdir, photos, args.small) if {"d", "e"} & scenarios else None
    else:
        corpus = make_corpus(args.workdir, args.images)
        small = make_small_corpus(args.workdir, args.small) if {"d", "e"} & scenarios else None
    big = make_big_corpus(args.workdir, corpus) if "c" in scenarios else None
    hostile = make_hostile_corpus(args.workdir, small) if small is not None and "e" in scenarios else None
    count = args.images
    say(
        f"warming the page cache: reading every source once{' (and the 4x hardlinks)' if big else ''}; "
        "each command also runs once untimed before the timed runs"
    )
    warm([corpus] + ([big] if big else []) + ([small] if small else []) + ([hostile] if hostile else []))

    variants = [(name, shlex.split(cmd)) for name, _, cmd in (c.partition("=") for c in args.compare)]

    def tc(src: Path, sizes: list[int], *more: str, base: list[str] | None = None) -> object:
        return lambda out: [
            *(base or thumbcli),
            "generate",
            str(src),
            "-o",
            str(out),
            *[a for s in sizes for a in ("-s", str(s))],
            "--json",
            "--quiet",
            *extra,
            *more,
        ]

    def xargs(sizes: list[int], src: Path = corpus) -> object:
        def line(out: Path) -> str:
            passes = []
            for s in sizes:
                dest = out / str(s) if len(sizes) > 1 else out
                mk = f"mkdir -p {shlex.quote(str(dest))} && " if len(sizes) > 1 else ""
                passes.append(
                    f"{mk}find {shlex.quote(str(src))} \\( -name '*.jpg' -o -name '*.png' \\) -print0 | "
                    f"xargs -0 -P {n} -n 50 vipsthumbnail -s {s} -o {shlex.quote(str(dest))}/%s.jpg"
                )
            return " && ".join(passes)

        return line

    def pil(sizes: list[int]) -> object:
        return lambda out: [
            sys.executable,
            "-c",
            _PILLOW_SCRIPT,
            str(corpus),
            str(out),
            str(n),
            ",".join(map(str, sizes)),
        ]

    groups: list[tuple[str, str, list[Tool]]] = []  # (scenario, reference tool name, tools)
    if "a" in scenarios:
        tools = [Tool("thumbcli", "a", tc(corpus, [256]), count, count)]
        for name, cmd in variants:
            tools.append(Tool(f"thumbcli[{name}]", "a", tc(corpus, [256], base=cmd), count, count))
        if args.sweep:
            for more in (["-j", "1"], ["-j", "3"], ["-j", "4"], ["--loaders", "1"], ["--loaders", "4"]):
                tools.append(Tool("thumbcli " + " ".join(more), "a", tc(corpus, [256], *more), count, count))
        if not args.only_thumbcli:
            tools.append(
                Tool(
                    "pyvips-naive",
                    "a",
                    lambda out: [sys.executable, "-c", _NAIVE_SCRIPT, str(corpus), str(out), "256"],
                    count,
                    count,
                    env={"VIPS_CONCURRENCY": "1"},
                )
            )
        if vipsthumbnail:
            tools.append(Tool("vips-xargs", "a", xargs([256]), count, count))
        if pillow:
            tools.append(Tool("pillow-pool", "a", pil([256]), count, count))
        if not args.only_thumbcli:
            floor = [sys.executable, "-c", _FLOOR_SCRIPT, str(corpus), str(n), "256"]
            tools.append(Tool("jpeg-floor (decode only)", "a", lambda out: floor, 0, count))
        groups.append(("a: one size 256", "vips-xargs", tools))
    if "b" in scenarios:
        tools = [Tool("thumbcli", "b", tc(corpus, [128, 256, 512]), 3 * count, count)]
        for name, cmd in variants:
            tools.append(Tool(f"thumbcli[{name}]", "b", tc(corpus, [128, 256, 512], base=cmd), 3 * count, count))
        if vipsthumbnail:
            tools.append(Tool("vips-xargs x3 passes", "b", xargs([128, 256, 512]), 3 * count, count))
        if pillow:
            tools.append(Tool("pillow-pool 3/open", "b", pil([128, 256, 512]), 3 * count, count))
        groups.append(("b: three sizes 128/256/512", "vips-xargs x3 passes", tools))
    if "c" in scenarios:
        assert big is not None
        tools = [
            Tool(f"thumbcli {count} img", "c", tc(corpus, [256]), count, count, memory=True),
            Tool(f"thumbcli {4 * count} img", "c", tc(big, [256]), 4 * count, 4 * count, memory=True),
        ]
        groups.append(("c: memory, corpus vs 4x corpus (hardlinks)", f"thumbcli {count} img", tools))

    if "d" in scenarios:
        assert small is not None
        k = args.small
        tools = [Tool("thumbcli", "d", tc(small, [256]), k, k)]
        for name, cmd in variants:
            tools.append(Tool(f"thumbcli[{name}]", "d", tc(small, [256], base=cmd), k, k))
        if vipsthumbnail:
            tools.append(Tool("vips-xargs", "d", xargs([256], small), k, k))
        groups.append((f"d: {k} small images 320x240, one size 256", "vips-xargs", tools))
    if "e" in scenarios:
        assert hostile is not None
        limit = ("--max-decode-time", str(HOSTILE_DECODE_SECONDS))
        both = HOSTILE_FINE + HOSTILE_SLOW
        tools = [Tool("thumbcli", "e", tc(hostile, [256], *limit), HOSTILE_FINE, both, exit_code=1)]
        for name, cmd in variants:
            base = tc(hostile, [256], *limit, base=cmd)
            tools.append(Tool(f"thumbcli[{name}]", "e", base, HOSTILE_FINE, both, exit_code=1))
        if vipsthumbnail:
            tools.append(Tool("vips-xargs (decodes the slow ones)", "e", xargs([256], hostile), both, both))
        title = f"e: {HOSTILE_FINE} small images and {HOSTILE_SLOW} that each kill their worker (over the decode time)"
        groups.append((title, "vips-xargs (decodes the slow ones)", tools))

    say("\ncommands (OUT is a fresh directory per run, all removed at the end):")
    all_tools = [t for _, _, ts in groups for t in ts]
    load_before = os.getloadavg()
    measure(all_tools, args.workdir, args.repeat)
    load_after = os.getloadavg()
    for _, _, ts in groups:
        ts[:] = [t for t in ts if t in all_tools]

    # -- report --------------------------------------------------------------------------------
    what = "camera JPEGs of 8-24 MP (EXIF, ICC)" if photos else f"sources of {WIDTH}x{HEIGHT}"
    say(f"\nmedian of {args.repeat} runs, warm page cache, {n} cores, {count} {what} Q{QUALITY}")
    say(
        "CPU s = user+sys of the process tree; RSS = peak of the largest single process; "
        "tree MB = peak of the summed PSS of the whole process tree (a page its processes share counted once)"
    )
    say(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        "(other load on the machine skews wall times; CPU ms/img much less)"
    )
    compared = [name for name, _ in variants]
    header = (
        f"{'scenario / tool':34} {'wall s':>7} {'rounds':>11} {'img/s':>7} {'CPU s':>7} {'CPU ms/img':>10} "
        f"{'RSS MB':>7} {'tree MB':>7} {'vs vips':>8} {'vs PIL':>7}"
        + "".join(f" {'vs ' + name:>10}" for name in compared)
    )
    results = []
    for title, ref_name, tools in groups:
        say(f"\n{title}\n{header}")
        by = {t.name: t for t in tools}
        ref = by.get(ref_name)
        pil_ref = next((t for t in tools if t.name.startswith("pillow")), None)
        for t in tools:
            wall, cpu, rss = med(t, "wall"), med(t, "cpu"), t.memory_mb("rss_mb")
            ips = t.images / wall
            r_v = f"{ips / (ref.images / med(ref, 'wall')):.2f}x" if ref and not title.startswith("c") else "-"
            r_p = f"{ips / (pil_ref.images / med(pil_ref, 'wall')):.2f}x" if pil_ref else "-"
            r_c = ""
            for name in compared:
                other = by.get(f"thumbcli[{name}]")
                r_c += f" {ips / (other.images / med(other, 'wall')):9.2f}x" if other else f" {'-':>10}"
            cpu_per = 1000 * cpu / t.images
            tree = t.memory_mb("tree_mb")
            walls = [run["wall"] for run in t.runs]
            rounds = f"{min(walls):.2f}-{max(walls):.2f}"
            say(
                f"{t.name:34} {wall:7.2f} {rounds:>11} {ips:7.1f} {cpu:7.2f} {cpu_per:10.1f} {rss:7.0f} {tree:7.0f} "
                f"{r_v:>8} {r_p:>7}{r_c}"
            )
            results.append(
                {
                    "scenario": t.scenario,
                    "tool": t.name,
                    "wall_s": wall,
                    "images_per_s": ips,
                    "cpu_s": cpu,
                    "rss_mb": rss,
                    "tree_mb": tree,
                    "runs": t.runs,
                }
            )
        if title.startswith("c") and len(tools) == 2:
            one, four = tools
            ratio = four.memory_mb("tree_mb") / one.memory_mb("tree_mb")
            verdict = "OK" if ratio <= 1.10 else "MISSED"
            say(f"peak tree memory (PSS) ratio {4 * count} vs {count} images: {ratio:.3f} (target <= 1.10: {verdict})")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    say(f"\nresults: {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
