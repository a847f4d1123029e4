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
            params = b.get("params") or {}
            impl = params.get("impl", params.get("mode", impl))
            if "blocks_per_s" in e:  # end-to-end cases: throughput instead of bytes
                impl = f"{impl} ({e['blocks_per_s']:,.0f} blocks/s)"
            mem = f"{e['peak_extra_mb']:.0f}" if e.get("peak_extra_mb", -1) >= 0 else "n/a"
            gbps = f"{e['gbps']:.1f}" if "gbps" in e else "n/a"
            frac = f"{100 * e['frac_copy_bw']:.0f}%" if "frac_copy_bw" in e else "n/a"
            print(f"| {group} | {impl} | {e['median_ms']:.3f} | {gbps} | {frac} | {mem} | "
                  f"{slowest / e['median_ms']:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
