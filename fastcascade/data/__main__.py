"""python -m fastcascade.data [--qp QP] [--4way] [--cache-dir DIR]: build (or load) the embedded
dataset and print its label distribution per split."""

import argparse
import time

from . import DEFAULT_QP, load_partition_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastcascade.data", description=__doc__)
    p.add_argument("--qp", type=float, default=DEFAULT_QP)
    p.add_argument("--4way", dest="include_4way", action="store_true", help="include HORZ_4 / VERT_4")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    t = time.perf_counter()
    splits = {s: load_partition_dataset(s, args.qp, args.cache_dir, args.include_4way, verbose=False)
              for s in ("train", "val", "all")}
    print(f"qp={args.qp} include_4way={args.include_4way} ({time.perf_counter() - t:.1f} s incl. cache)")
    for name, ds in splits.items():
        print(f"{name}: {ds}\n{ds.distribution()}")


if __name__ == "__main__":
    main()
