"""python -m ood_lib.data --prepare NAME...: load every split of each set once (converting it to the cache)
and print counts, shapes and seconds."""
from __future__ import annotations

import argparse
import sys
import time

from ood_lib.data import DATASETS, DatasetCorrupt, DatasetMissing, load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ood_lib.data", description="Convert datasets to the cache.")
    parser.add_argument("--prepare", nargs="+", metavar="NAME", choices=list(DATASETS), required=True,
                        help=f"datasets to load once (all splits): {', '.join(DATASETS)}")
    args = parser.parse_args(argv)
    for name in args.prepare:
        for split in DATASETS[name].splits:
            start = time.perf_counter()
            try:
                a = load_dataset(name, split)
            except (DatasetMissing, DatasetCorrupt) as e:
                print(f"{type(e).__name__}: {e}", file=sys.stderr)
                return 1
            print(f"{name:15s} {split:6s} {len(a):6d} images x {a.x.shape[1:]}  "
                  f"{time.perf_counter() - start:6.1f} s  sha256 {a.checksum[:12]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
