"""Every command against its floor, as a ratio measured in the same run (`make bench`).

Each row runs a vggnorm command and its floor as whole processes (interpreter start and imports
included, as a user or a CI job pays them), alternating, --repeats pairs; the median of each is kept,
with its peak RSS (``/usr/bin/time``). Rows:

  compute-stats      vs a naive loop: decode each file with PIL, torchvision's transform, forward
  verify             (no --data) vs torch.load of the original and the normalized checkpoint
  verify --data      vs compute-stats on the same photos
  apply              vs torch.load + torch.save of the same checkpoint
  unknown --arch     (a usage error) vs --help
  apply random:0     vs apply from a file holding the same weights

The table is printed, and written with the commit, machine and date to bench/results/COMMIT.json (one
file per commit, so a regression shows as a jump) and docs/benchmarks.md (the docs' page). Timings on a
shared machine are noisy: this is no pass/fail test.

Usage: python scripts/bench_commands.py [--arch vgg16] [--photos 8] [--repeats 3] [--rows apply,verify]
                                        [--baseline COMMIT]

``--baseline COMMIT`` sets an earlier run's ratios (bench/results/COMMIT.json) beside today's, in the table
and on the page.

``--rows`` measures only the named rows (a quick look while working); the results JSON and the docs'
page are written only by a run of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
# this checkout's code, here and in every command measured (whichever checkout the environment installed)
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])

SIZE = ["--resize", "128", "--crop", "112", "--workers", "0", "--no-progress"]

NAIVE = r"""
import sys, torch, torchvision
from PIL import Image
from torchvision.transforms._presets import ImageClassification
arch, weights, folder = sys.argv[1:4]
model = torchvision.models.get_model(arch)
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
transform = ImageClassification(crop_size=112, resize_size=128)
files = sorted(p for p in __import__("pathlib").Path(folder).iterdir())
with torch.inference_mode():
    for i in range(0, len(files), 32):
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[i : i + 32]])
        model(x)
"""

LOAD = r"""
import sys, torch
for path in sys.argv[1:]:
    torch.load(path, map_location="cpu", weights_only=True)
"""

LOAD_SAVE = r"""
import sys, torch
torch.save(torch.load(sys.argv[1], map_location="cpu", weights_only=True), sys.argv[2])
"""


# each row and its floor, in the table's order
FLOORS = {
    "compute-stats": "a naive decode + forward loop",
    "verify": "loading both checkpoints",
    "verify --data": "compute-stats on the same photos",
    "apply": "torch.load + torch.save",
    "unknown --arch": "--help",
    "apply random:0": "apply from a file",
}


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process."""
    out = cwd / "time.txt"
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(out), *cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 2):  # 2: the usage-error row
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, int(out.read_text().split()[-1]) / 1024


def vggnorm(*args: object) -> list[str]:
    return [sys.executable, "-m", "vggnorm", *[str(a) for a in args]]


def python(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *[str(a) for a in args]]


def pair(name: str, command: list[str], floor: list[str], cwd: Path, repeats: int, clean: list[Path]) -> dict:
    runs: dict[str, list[tuple[float, float]]] = {"command": [], "floor": []}
    for _ in range(repeats):
        for key, cmd in (("command", command), ("floor", floor)):
            for p in clean:
                p.unlink(missing_ok=True)
            runs[key].append(timed(cmd, cwd))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
    row = {
        "row": name,
        "seconds": round(med["command"][0], 2),
        "floor_seconds": round(med["floor"][0], 2),
        "time_ratio": round(med["command"][0] / med["floor"][0], 2),
        "rss_mb": round(med["command"][1]),
        "floor_rss_mb": round(med["floor"][1]),
        "rss_ratio": round(med["command"][1] / med["floor"][1], 2),
    }
    print(
        f"{name:22s} {row['seconds']:7.2f} s vs {row['floor_seconds']:7.2f} s  {row['time_ratio']:5.2f}x   "
        f"{row['rss_mb']:6d} MB vs {row['floor_rss_mb']:6d} MB  {row['rss_ratio']:5.2f}x",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", help=f"comma-separated rows to measure, of: {', '.join(FLOORS)} [default: all]")
    parser.add_argument("--baseline", help="an earlier commit measured here (bench/results/COMMIT.json)")
    args = parser.parse_args()
    base: dict[str, dict] = {}
    if args.baseline:
        path = ROOT / "bench" / "results" / f"{args.baseline}.json"
        if not path.is_file():
            parser.error(f"no {path.relative_to(ROOT)}: run make bench at {args.baseline} first")
        base = {r["row"]: r for r in json.loads(path.read_text())["rows"]}
    only = [r.strip() for r in args.rows.split(",")] if args.rows else list(FLOORS)
    unknown = [r for r in only if r not in FLOORS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(FLOORS)}")

    import torch

    from sample_photos import write_photos
    from vggnorm.io.weights import random_state_dict

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        photos = d / "photos"
        photos.mkdir()
        write_photos(photos)
        for extra in sorted(photos.iterdir())[args.photos :]:
            extra.unlink()
        ckpt = d / f"{args.arch}.pth"
        torch.save(random_state_dict(args.arch, 0), ckpt)
        stats, out = d / "s.h5", d / "n.pth"
        subprocess.run(
            vggnorm("compute-stats", photos, "--arch", args.arch, "--weights", ckpt, "-o", stats, *SIZE),
            check=True,
            cwd=d,
        )
        subprocess.run(vggnorm("apply", ckpt, "--stats", stats, "-o", out), check=True, cwd=d, capture_output=True)
        r0 = d / "r0.h5"
        subprocess.run(
            vggnorm("compute-stats", photos, "--arch", args.arch, "--weights", "random:0", "-o", r0, *SIZE),
            check=True,
            cwd=d,
        )
        outputs = [d / "a.pth", d / "a.report.json", d / "a.report.md", d / "a.report.png", d / "copy.pth", d / "c.h5"]
        print(f"{'row':22s} {'command':>9s}    {'floor':>9s}  {'ratio':>5s}   {'memory':>9s}    {'floor':>9s}  ratio")
        specs = [
            (
                "compute-stats",
                vggnorm("compute-stats", photos, "--arch", args.arch, "--weights", ckpt, "-o", d / "c.h5", *SIZE),
                python(NAIVE, args.arch, ckpt, photos),
            ),
            (
                "verify",
                vggnorm("verify", out, "--original", ckpt, "--stats", stats),
                python(LOAD, ckpt, out),
            ),
            (
                "verify --data",
                vggnorm("verify", out, "--data", photos, "--workers", 0, "--no-progress"),
                vggnorm("compute-stats", photos, "--arch", args.arch, "--weights", ckpt, "-o", d / "c.h5", *SIZE),
            ),
            (
                "apply",
                vggnorm("apply", ckpt, "--stats", stats, "-o", d / "a.pth"),
                python(LOAD_SAVE, ckpt, d / "copy.pth"),
            ),
            (
                "unknown --arch",
                vggnorm("compute-stats", photos, "--arch", "vgg99", "-o", d / "c.h5"),
                vggnorm("--help"),
            ),
            (
                "apply random:0",
                vggnorm("apply", "random:0", "--stats", r0, "-o", d / "a.pth"),
                vggnorm("apply", ckpt, "--stats", stats, "-o", d / "a.pth"),
            ),
        ]
        rows = [pair(name, command, floor, d, args.repeats, outputs) for name, command, floor in specs if name in only]
    if base:
        print(f"ratios at {args.baseline} -> today:")
        for r in rows:  # every row measured, one the baseline lacks said so
            b = base.get(r["row"])
            was = (f"{b['time_ratio']:5.2f}x", f"{b['rss_ratio']:5.2f}x") if b else ("    -", "    -")
            print(
                f"{r['row']:22s} time {was[0]} -> {r['time_ratio']:5.2f}x   memory {was[1]} -> {r['rss_ratio']:5.2f}x"
                + ("" if b else f"   (not measured at {args.baseline})")
            )
    record = {
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}",
        "arch": args.arch,
        "photos": args.photos,
        "repeats": args.repeats,
        "rows": rows,
        **({"baseline": args.baseline} if base else {}),
    }
    if len(rows) < len(FLOORS):
        print("(some rows only: nothing written)")
        return
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{record['commit']}.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`scripts/bench_commands.py`) at commit `{record['commit']}`, "
        f"{record['date']}, on {record['machine']}: {args.arch} with random weights, {args.photos} photos at "
        f"`--resize 128 --crop 112`, the median of {args.repeats} alternating runs of each command and its floor "
        "(whole processes).",
        "",
        "| command | its floor | time | floor | ratio | peak RSS | floor | ratio |"
        + (f" ratios at `{args.baseline}` (time, memory) |" if base else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if base else ""),
    ]
    for r in rows:
        lines.append(
            f"| `{r['row']}` | {FLOORS[r['row']]} | {r['seconds']} s | {r['floor_seconds']} s | {r['time_ratio']}x | "
            f"{r['rss_mb']} MB | {r['floor_rss_mb']} MB | {r['rss_ratio']}x |"
            + (
                f" {base[r['row']]['time_ratio']}x, {base[r['row']]['rss_ratio']}x |"
                if r["row"] in base
                else (" |" if base else "")
            )
        )
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"wrote bench/results/{record['commit']}.json and docs/benchmarks.md")


if __name__ == "__main__":
    main()
