"""Benchmark `vggnorm verify` without --data against merely loading the two checkpoints.

For each arch: random weights (torchvision's seeded init) saved to a file, statistics on a few photos,
apply; then, each in a fresh process, best of --repeats:

  L  torch.load(weights_only=True) of the original and the normalized checkpoint (and `import torch`)
  V  vggnorm verify NORMALIZED --original ORIG --stats S (checks: activations, logits, fold)

and prints V/L for time and for peak RSS. Goal: time <= 1.5x, memory <= 2x.

Usage: python scripts/bench_verify.py [--archs vgg16 vgg19_bn] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample_photos import write_photos  # noqa: E402
from vggnorm.io.weights import random_state_dict  # noqa: E402

# Each is timed as a CI job pays it: the whole process, interpreter start and `import torch` included.
LOAD = r"""
import json, resource, sys
import torch
a = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
b = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "code": 0}))
"""

VERIFY = r"""
import json, resource, sys
from vggnorm.cli import cli
try:
    cli(sys.argv[1:], prog_name="vggnorm", standalone_mode=False)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "code": code}))
"""


def child(code: str, *args: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        sys.exit(f"bench_verify.py: a child process failed:\n{r.stderr[-2000:]}")
    return {**json.loads(lines[-1]), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["vgg16", "vgg19_bn"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vggnorm-bench-verify-"))
    write_photos(tmp / "photos")
    for arch in args.archs:
        orig, stats, out = tmp / f"{arch}.pth", tmp / f"{arch}.h5", tmp / f"{arch}-n.pth"
        torch.save(random_state_dict(arch, 0), orig)
        for cmd in (
            [
                "compute-stats",
                tmp / "photos",
                "--arch",
                arch,
                "--weights",
                orig,
                "-o",
                stats,
                "--resize",
                "64",
                "--crop",
                "64",
                "--workers",
                "0",
                "--no-progress",
            ],
            ["apply", orig, "--stats", stats, "-o", out],
        ):
            subprocess.run([sys.executable, "-m", "vggnorm", *map(str, cmd)], check=True, capture_output=True)
        loads = [child(LOAD, str(orig), str(out)) for _ in range(args.repeats)]
        verify_args = ["verify", str(out), "--original", str(orig), "--stats", str(stats), "--no-progress"]
        verifies = [child(VERIFY, *verify_args) for _ in range(args.repeats)]
        if any(v["code"] != 0 for v in verifies):
            sys.exit(f"bench_verify.py: verify did not pass on {arch}")
        lt, vt = min(x["seconds"] for x in loads), min(x["seconds"] for x in verifies)
        lm, vm = max(x["rss_mb"] for x in loads), max(x["rss_mb"] for x in verifies)
        size = (orig.stat().st_size + out.stat().st_size) / 2**20
        print(f"{arch}: checkpoints {size:.0f} MB together")
        print(f"  L load both     {lt:6.2f} s  {lm:7.0f} MB peak RSS")
        print(f"  V verify        {vt:6.2f} s  {vm:7.0f} MB peak RSS")
        print(f"  V/L time {vt / lt:.2f} (goal <= 1.5), memory {vm / lm:.2f} (goal <= 2)", flush=True)


if __name__ == "__main__":
    main()
