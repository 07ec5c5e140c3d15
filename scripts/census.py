"""Census: every classification model torchvision ships, through vggnorm's public API, checked by the tests' oracle.

For each model of ``torchvision.models.list_models(module=torchvision.models)``: random initialization
(``weights=None``) with random BatchNorm statistics and affine parameters (``tests/contract.py``'s
``randomize``), float64, eval mode, on a small input it accepts (64x64, else larger). The model is analyzed
first (``vggnorm.analyze``); a refused model is reported with its first refusal; an accepted one is checked
by ``contract.check_contract`` (``measure_means``, ``normalize_model``, ``scales``, against the oracle's own
per-call measurements): outputs unchanged to 1e-10, every site's activation divided by the divisor the
contract says, statistics equal to the model run as written.

Verdicts: ``exact``, ``refused`` (with the reason), ``NOT EXACT`` (with the first violation), ``error``
(the model did not build or run), ``timeout``, ``skipped`` (``--skip-large``: accepted, too large to check
in float64 here). Each model runs in a subprocess of its own (memory back after each, a timeout per model).

    python scripts/census.py                          # every model, table to docs/census.md
    python scripts/census.py --models resnet18 densenet121 --out /tmp/census.md
    python scripts/census.py --skip-large --timeout 600

Run from the repository root with ``PYTHONPATH=src`` (or vggnorm installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 96, 128, 224, 299)
LARGE_PARAMS = 150e6  # --skip-large: accepted models above this are not checked in float64
EXPECT_EXACT = (
    "resnet",
    "resnext",
    "wide_resnet",
    "densenet",
    "googlenet",
    "inception_v3",
    "shufflenet_v2",
    "regnet_y",
    "regnet_x",
    "vgg",
    "alexnet",
    "squeezenet",
    "mnasnet",
)
EXPECT_REFUSED = ("vit_", "swin_", "convnext_", "efficientnet_", "mobilenet_", "maxvit_")


def expectation(name: str) -> str:
    if name.startswith(EXPECT_EXACT):
        return "exact"
    if name.startswith(EXPECT_REFUSED):
        return "refused"
    return "?"


def one(name: str, skip_large: bool) -> dict:
    """Analyze and check one model, in this process; a row of the table."""
    sys.path.insert(0, str(ROOT / "tests"))
    import logging

    import torch
    import torchvision

    import vggnorm
    from contract import check_contract, images, randomize

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    row: dict = {"model": name}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    params = sum(p.numel() for p in model.parameters())
    row["params"] = params
    size = None
    with torch.no_grad():
        for s in SIZES:
            try:
                model(torch.zeros(1, 3, s, s))
            except Exception:
                continue
            size = s
            break
    if size is None:
        return {**row, "verdict": "error", "reason": f"runs on none of the input sizes {SIZES}"}
    row["size"] = size
    model = randomize(model, seed=0)
    x = images(size, batch=2)

    topo = vggnorm.analyze(model)
    row["sites"] = len(topo.all_sites)
    row["streams"] = sum(1 for st in getattr(topo, "streams", ()) if len(st.sites) > 1)
    left = tuple(getattr(topo, "left_unscaled", ()) or ())
    row["left_unscaled"] = len(left)
    if topo.refusals:
        first = topo.refusals[0]
        return {**row, "verdict": "refused", "reason": f"{first.node}: {first.reason}"}
    if skip_large and params > LARGE_PARAMS:
        return {
            **row,
            "verdict": "skipped",
            "reason": f"accepted by analyze; --skip-large: {params / 1e6:.0f}M parameters not checked in float64",
        }

    def may_unscale(sites):  # the activations vggnorm says it left unscaled (the outputs check decides)
        return [s.call for s in sites if s.relu in left and isinstance(getattr(s, "call", None), int)]

    outcome = check_contract(model, x, may_unscale_of=may_unscale)
    row["sites"] = len(outcome.sites)
    row["calls"] = outcome.n_calls
    if not outcome.accepted:
        reason = outcome.refusal + (f"; oracle: {outcome.problems[0]}" if outcome.problems else "")
        return {**row, "verdict": "refused", "reason": reason}
    if outcome.problems:
        first = outcome.problems[0].splitlines()[0]
        return {**row, "verdict": "NOT EXACT", "reason": f"{len(outcome.problems)} violations; {first}"}
    note = f"{len(left)} left unscaled" if left else ""
    return {**row, "verdict": "exact", "reason": note}


def cell(text: object, limit: int = 160) -> str:
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def table(rows: list[dict], command: str) -> str:
    import torchvision

    today = datetime.date.today().isoformat()
    lines = [
        "# Census: torchvision's classification models through vggnorm",
        "",
        f"`{command}` — torchvision {torchvision.__version__}, {today}. Random init (`weights=None`), random "
        "BatchNorm statistics, float64, eval mode, 2 images of the size given; checked by `tests/contract.py` "
        "(outputs unchanged to 1e-10 relative, every site divided by its contract divisor, statistics as the "
        "model runs). *sites*: sites found (activation calls in one forward, when checked); *streams*: "
        "streams of two or more sites; *expected*: the verdict its family should get (ReLU networks exact, "
        "the others refused).",
        "",
        "| model | verdict | expected | size | sites | streams | seconds | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sites = r.get("sites", "")
        if r.get("calls"):
            sites = f"{sites} ({r['calls']} calls)"
        lines.append(
            f"| {r['model']} | {r['verdict']} | {expectation(r['model'])} | {r.get('size', '')} | {sites} | "
            f"{r.get('streams', '')} | {r.get('seconds', '')} | {cell(r.get('reason', ''))} |"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    off = [r["model"] for r in rows if expectation(r["model"]) not in ("?", r["verdict"])]
    lines += ["", "Totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "."]
    lines.append("Not as expected: " + (", ".join(off) if off else "none") + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="a subset (names as list_models gives them; commas work too)")
    parser.add_argument("--out", default="docs/census.md", help="the markdown table (default: docs/census.md)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per model (default 1200)")
    parser.add_argument(
        "--skip-large",
        action="store_true",
        help=f"do not run the float64 check of accepted models above {LARGE_PARAMS / 1e6:.0f}M parameters",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, JSON row to --row-out
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        try:
            row = one(args.one, args.skip_large)
        except Exception as e:
            row = {"model": args.one, "verdict": "error", "reason": f"{type(e).__name__}: {e}"}
        Path(args.row_out).write_text(json.dumps(row))
        return 0

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        wanted = [n for m in args.models for n in m.split(",") if n]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"not classification models of torchvision: {', '.join(unknown)}")
        names = wanted
    command = "python scripts/census.py " + " ".join(sys.argv[1:])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row_path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--one", name, "--row-out", str(row_path)]
            if args.skip_large:
                cmd.append("--skip-large")
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
                if row_path.exists():
                    row = json.loads(row_path.read_text())
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                    row = {"model": name, "verdict": "error", "reason": tail[0]}
            except subprocess.TimeoutExpired:
                row = {"model": name, "verdict": "timeout", "reason": f"over {args.timeout:.0f} s"}
            row["seconds"] = round(time.monotonic() - start)
            rows.append(row)
            print(
                f"{name:22s} {row['verdict']:9s} sites={row.get('sites', '')} streams={row.get('streams', '')} "
                f"{row['seconds']:4d}s  {cell(row.get('reason', ''), 110)}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(rows, command))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
