#!/usr/bin/env python
"""The 3D check of a built-in-model run: `python scripts/eval_toy3d.py RUN_DIR [--out FILE]`.

Renders the run's NeRF (and its mesh, if the mesh stage ran) from 8 fixed views and compares them
with the true shape's exact renders from the same cameras: silhouette IoU and foreground colour.
Target for `steindreamer generate "a red cube" --preset toy`: mean IoU >= 0.6 with the right colour."""
import argparse
import json
import sys

from steindreamer.toy.check3d import evaluate_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    result = evaluate_run(args.run_dir, args.views, args.resolution)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from steindreamer.fsio import atomic_write

        atomic_write(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
