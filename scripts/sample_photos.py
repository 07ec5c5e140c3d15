"""Write scikit-image's bundled real photos into a folder as JPEGs (demo and benchmark data).

Usage: python scripts/sample_photos.py OUT_DIR [--copies K] [--size WxH]

--copies K writes each photo K times with a small crop offset, so a benchmark gets many distinct
files; --size resizes to an ImageNet-like size (ILSVRC2012 val images are about 500x375).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# The real photographs bundled with scikit-image (no download); camera and moon are grayscale.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "moon")


def load_photos() -> dict[str, np.ndarray]:
    import skimage.data

    out = {}
    for name in PHOTOS:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        img = fn()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out[name] = img[..., :3].astype(np.uint8)
    return out


def write_photos(
    out_dir: Path, *, copies: int = 1, size: tuple[int, int] | None = None, ext: str = ".JPEG"
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, arr in load_photos().items():
        for k in range(copies):
            img = Image.fromarray(arr[k % 7 :, k % 5 :])  # distinct files, same content class
            if size is not None:
                img = img.resize(size, Image.BILINEAR)
            path = out_dir / (f"{name}_{k:05d}{ext}" if copies > 1 else f"{name}{ext}")
            img.save(path, quality=90)
            written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--size", default=None, help="WxH, e.g. 500x375")
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.split("x")) if a.size else None
    files = write_photos(a.out_dir, copies=a.copies, size=size)  # type: ignore[arg-type]
    print(f"wrote {len(files)} photos to {a.out_dir}")


if __name__ == "__main__":
    main()
