"""Start-up of `thumbcli`: what every run pays before it walks a folder or starts a worker.

    python bench/bench_startup.py [--rounds 21] [--compare NAME=PYTHON ...]

Times with this interpreter (and each --compare one, e.g. another install's), round-robin so
that the machine's slow moments fall on every row alike:

  python -c pass                  the interpreter alone (the reference of the ratios)
  generate --help                 `python -m thumbcli generate --help`, a whole process
  rerun imports                   `python -c 'import thumbcli.cli, thumbcli.run, thumbcli.progress'`:
                                  what a no-change `generate --cache` rerun imports, a whole process
  thumbcli's own modules          in one process, the same imports with click and every other
                                  module they pull in (found by `-X importtime`) loaded first
  of which dataclasses            the part of that spent building dataclasses (each frozen one
                                  compiles six methods in Python 3.11)

Prints the median, min and max of the rounds in milliseconds, and each whole process's median
as a ratio to `python -c pass`. Use a regular install (`pip install .` into a venv): an editable one's import
hook adds its own cost to every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RERUN_MODULES = ("thumbcli.cli", "thumbcli.run", "thumbcli.progress")

# Bytecode as an installed package has it (pip compiles it): without this, a
# PYTHONDONTWRITEBYTECODE environment recompiles every changed module on every run.
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}

#: Run in a child: import `others` (every module the rerun needs that is not thumbcli's), then
#: thumbcli's, timing that and the dataclasses it builds; print both in milliseconds as JSON.
OWN_MODULES = """
import importlib, json, sys, time
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # a platform's module that importtime listed as tried (nt, _winapi)
import dataclasses
build = dataclasses._process_class
spent = [0.0]
def timed(*args, **kwargs):
    started = time.perf_counter()
    try:
        return build(*args, **kwargs)
    finally:
        spent[0] += time.perf_counter() - started
dataclasses._process_class = timed
started = time.perf_counter()
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
print(json.dumps([(time.perf_counter() - started) * 1e3, spent[0] * 1e3]))
"""


def wall_ms(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False, env=ENV, timeout=60)
    elapsed = (time.perf_counter() - started) * 1e3
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed


def other_modules(python: str) -> list[str]:
    """The modules a rerun's imports pull in that are not thumbcli's, in the order they are imported."""
    code = f"import {', '.join(RERUN_MODULES)}"
    proc = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, env=ENV)
    names = [line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return [name for name in names[1:] if name != "thumbcli" and not name.startswith("thumbcli.")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=PYTHON", help="also time this interpreter's thumbcli"
    )
    args = parser.parse_args()
    pythons = [("this", sys.executable), *(tuple(spec.split("=", 1)) for spec in args.compare)]

    # (label, argv, whether the child reports its own times rather than being timed whole)
    rows: list[tuple[str, list[str], bool]] = [("python -c pass", [sys.executable, "-c", "pass"], False)]
    for name, python in pythons:
        own = [python, "-c", OWN_MODULES, json.dumps(other_modules(python)), json.dumps(list(RERUN_MODULES))]
        rows += [
            (f"{name}: generate --help", [python, "-m", "thumbcli", "generate", "--help"], False),
            (f"{name}: rerun imports", [python, "-c", f"import {', '.join(RERUN_MODULES)}"], False),
            (f"{name}: thumbcli's own modules", own, True),
        ]
    times: dict[str, list[float]] = {}
    in_process: set[str] = set()
    for _ in range(args.rounds):
        for label, argv, reports in rows:
            if not reports:
                times.setdefault(label, []).append(wall_ms(argv))
                continue
            out = subprocess.run(argv, capture_output=True, text=True, check=True, env=ENV, timeout=60).stdout
            own_ms, dataclass_ms = json.loads(out)
            part = f"{label.partition(':')[0]}:   of which dataclasses"
            times.setdefault(label, []).append(own_ms)
            times.setdefault(part, []).append(dataclass_ms)
            in_process |= {label, part}
    reference = statistics.median(times["python -c pass"])
    print(f"{args.rounds} interleaved rounds, milliseconds; ratio = median / python -c pass's median")
    print(f"{'':40} {'median':>8} {'min':>8} {'max':>8} {'ratio':>7}")
    for label, values in times.items():
        median = statistics.median(values)
        ratio = "" if label in in_process else f"{median / reference:6.2f}x"  # a part of a process, not one
        print(f"{label:40} {median:8.1f} {min(values):8.1f} {max(values):8.1f} {ratio:>7}")
    print("\ninterpreters:", ", ".join(f"{name} = {python}" for name, python in pythons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
