"""Regenerate the docs' figures from the demo: the pictures vggnorm itself draws, copied into docs/img/.

  docs/img/demo-apply-report.png  apply's report figure (every filter's mean per layer before normalization,
                                  and each live filter's |mean - 1| after): demo/vgg19-normalized.report.png
  docs/img/demo-verify.png        verify's figure (the means it re-measured on the photos, and the measured
                                  ones before): demo/verify.png

Runs ``scripts/demo.sh`` (what ``make demo`` runs: torchvision's seeded random VGG19 on scikit-image's
photos, a few minutes on 2 CPU cores) unless ``--demo DIR`` names a folder it has already written.

Usage: python scripts/docs_figures.py [--demo DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"vgg19-normalized.report.png": "demo-apply-report.png", "verify.png": "demo-verify.png"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=None, help="a folder scripts/demo.sh wrote (default: run it)")
    a = ap.parse_args()
    demo = a.demo
    if demo is None:
        demo = ROOT / "demo"
        subprocess.run(["bash", "scripts/demo.sh", str(demo)], cwd=ROOT, check=True)
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    for source, target in FIGURES.items():
        shutil.copyfile(demo / source, out / target)
        print(f"{demo / source} -> {out / target}")


if __name__ == "__main__":
    main()
