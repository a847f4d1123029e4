"""Markdown table from a pytest-benchmark JSON file: python bench/report.py bench.json"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    info = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"device: {info.get('device')} | torch {info.get('torch')} | copy bandwidth "
          f"{info.get('copy_bw_gbps', 0):.0f} GB/s | {data.get('datetime', '')[:10]}\n")
    print("| case | implementation | median ms | GB/s | % copy BW | peak extra MB | vs slowest |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["extra_info"]["median_ms"])
        slowest = max(b["extra_info"]["median_ms"] for b in rows)
        for b in rows:
            e = b["extra_info"]
            impl = b["param"] if "param" in b and b["param"] else b["name"]
            impl = b["params"].get("impl", impl) if b.get("params") else impl
            mem = f"{e['peak_extra_mb']:.0f}" if e["peak_extra_mb"] >= 0 else "n/a"
            print(f"| {group} | {impl} | {e['median_ms']:.3f} | {e['gbps']:.1f} | {100 * e['frac_copy_bw']:.0f}% "
                  f"| {mem} | {slowest / e['median_ms']:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
