"""Score a folder of images with a trained run from Python (``agpctl.api``): one line per image.

    .venv/bin/python examples/use_from_python.py runs/<run> path/to/images [--category NAME]

The numbers are those ``agpctl predict`` writes; an unreadable file is named and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys

from agp_data.images import is_image_file
from agpctl.api import UserError, load

CHUNK = 32  # images per call: each result holds its full-size map, so a big folder goes a chunk at a time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or s3:// URI written by agpctl train")
    parser.add_argument("images", help="folder of images to score")
    parser.add_argument("--category", help="the images' category (per-category runs: which model)")
    args = parser.parse_args()
    try:
        names = sorted(n for n in os.listdir(args.images) if is_image_file(n))
        detector = load(args.run, category=args.category)
    except (OSError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = [os.path.join(args.images, n) for n in names]
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        try:
            results = detector.predict(chunk)
        except UserError:  # one unreadable file fails its whole call: score the chunk one by one
            results = None
        for index, path in enumerate(chunk):
            try:
                [r] = [results[index]] if results is not None else detector.predict(path)
            except UserError as exc:
                print(f"{path}: skipped ({exc})")
                continue
            verdict = "ANOMALOUS" if r.anomalous else "normal"
            print(f"{path}: {verdict} score {r.score:.4f} (threshold {r.image_threshold:.4f}), "
                  f"category {r.category or '?'} ({r.category_source}), defect {int(r.mask.sum())} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
