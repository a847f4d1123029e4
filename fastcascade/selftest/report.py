"""What a self-test found: one row per op, shape, dtype and backend; the table, the summary and JSON."""

from __future__ import annotations

import dataclasses
import math

from .tolerance import EPS_FLOOR, TOLERANCE_FACTOR

# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class SelftestRow:
    """One op at one shape and dtype on one backend. error / tolerance are those of the output with the
    largest error-to-tolerance ratio (`worst`); exact outputs count `mismatches` elements instead."""

    op: str
    backend: str
    device: str
    tier: str
    shape: str
    dtype: str
    exact: bool  # every output compared exactly
    agrees: bool
    deterministic: bool | None
    error: float | None = None
    tolerance: float | None = None
    worst: str | None = None
    mismatches: int = 0
    failure: str | None = None  # why the row fails (or the exception a backend raised)
    ms: float | None = None
    eager_ms: float | None = None
    compile_ms: float | None = None
    vs_eager: float | None = None  # eager_ms / ms: > 1 is faster than the eager reference
    vs_compile: float | None = None
    frac_copy_bw: float | None = None
    bytes: int | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.agrees and self.deterministic is True and self.failure is None

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.failure and not self.agrees and self.deterministic is None:
            return "ERROR"
        flags = (("DISAGREES", not self.agrees), ("NONDETERMINISTIC", self.deterministic is False))
        return " ".join(s for s, bad in flags if bad) or "FAIL"


@dataclasses.dataclass
class SelftestResult:
    """What selftest() found: rows (one per op, shape, dtype and backend), the backends run and those
    skipped with the reason, and the environment. ok is True when every row agrees and is deterministic."""

    device: str
    device_name: str
    quick: bool
    backends: list
    skipped: dict
    rows: list
    environment: dict
    copy_bandwidth_gbps: float | None = None
    elapsed_s: float = 0.0
    complete: bool = False
    timing_cut: bool = False  # the timing budget ran out: some rows were not timed (correctness is complete)

    @property
    def ok(self) -> bool:
        return self.complete and bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["ok"], row["status"] = r.ok, r.status
        d["ok"] = self.ok
        d["tolerance_model"] = (f"float outputs: relative L2 error vs the float64 reference <= "
                                f"{TOLERANCE_FACTOR:g} x the reference's own error in that dtype + {EPS_FLOOR} eps; "
                                f"integer outputs and row copies: exact")
        return d

    def table(self) -> str:
        head = ["op", "backend", "shape", "dtype", "max err / tol", "det", "ms", "vs eager", "vs compile",
                "copy BW", "status"]
        lines = []
        for r in self.rows:
            if r.failure and r.deterministic is None:
                err = "error"
            elif r.exact:
                err = "exact" if r.mismatches == 0 else f"{r.mismatches} differ"
            else:
                err = f"{fmt_sci(r.error)} / {fmt_sci(r.tolerance)}"
                err += f" +{r.mismatches} differ" if r.mismatches else ""
            det = {True: "yes", False: "NO", None: "-"}[r.deterministic]
            lines.append([r.op, r.backend, r.shape, r.dtype, err, det, _fmt(r.ms, "{:.3f}"),
                          _fmt(r.vs_eager, "{:.2f}x"), _fmt(r.vs_compile, "{:.2f}x"), _fmt(r.frac_copy_bw, "{:.0%}"),
                          r.status])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*ln) for ln in lines]
        return "\n".join(line.rstrip() for line in out)

    def summary(self) -> str:
        n_bad = len(self.failures)
        skipped = "; ".join(f"{b}: {why}" for b, why in self.skipped.items())
        s = (f"fastcascade selftest on {self.device} ({self.device_name}){' --quick' if self.quick else ''}: "
             f"{len(self.rows)} rows, backends {', '.join(self.backends)}, {n_bad} failing, "
             f"{self.elapsed_s:.1f} s")
        if self.copy_bandwidth_gbps:
            s += f", copy bandwidth {self.copy_bandwidth_gbps:.0f} GB/s"
        if skipped:
            s += f"\nskipped backends: {skipped}"
        for r in self.failures:
            s += f"\nFAIL {r.op} {r.backend} {r.shape} {r.dtype}: {r.failure}"
        if self.timing_cut:
            s += "\nthe timing budget ran out: rows showing '-' were not timed"
        if not self.complete:
            s += "\nthe run did not complete"
        return s + ("\nPASS" if self.ok else "\nFAIL")

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def fmt_sci(v) -> str:
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2e}")


def _fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)

