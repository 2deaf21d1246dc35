"""What the up-front check of dataset=imagefolder costs, next to decoding the same files once.

Writes N ImageNet-sized JPEGs (500x375, random smooth content) into a temp dir, then times
(a) the scan qexp runs before training (PIL open + verify, no decoding; qexp/data/bad_images.py)
and (b) one pass of decoding them to RGB as the DataLoader does, both on one thread, and prints
the ratio. The files are in the page cache by then, so this is the CPU side only; on a network
file system each open adds a round trip to both.

    python scripts/bench_image_scan.py --n 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from qexp.data.bad_images import scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="number of JPEG files")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.n):
            small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
            path = Path(tmp) / f"{i}.jpg"
            image.save(path, quality=90)
            paths.append(str(path))
        size_kb = sum(Path(p).stat().st_size for p in paths) / len(paths) / 1024

        t0 = time.perf_counter()
        bad = scan(paths, threads=1)
        t_scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in paths:
            with Image.open(p) as image:
                image.convert("RGB")
        t_decode = time.perf_counter() - t0
    assert not bad
    print(f"{args.n} JPEGs of 500x375 ({size_kb:.0f} KB each on average), one thread:")
    print(f"  scan (open + verify): {1e6 * t_scan / args.n:7.0f} us per file")
    print(f"  decode to RGB:        {1e6 * t_decode / args.n:7.0f} us per file")
    print(f"  scan / decode:        {t_scan / t_decode:7.3f}")


if __name__ == "__main__":
    main()
