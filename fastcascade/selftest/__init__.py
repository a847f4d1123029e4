"""``python -m fastcascade selftest`` and ``fastcascade.selftest()``: check every op on every backend here.

What a user runs on their own machine before trusting the kernels there. For every op of the public API
and every backend available on the device at hand (the C++ CPU kernels, the pure-PyTorch reference,
Triton; on a GPU the CUDA C++ kernels and compiled Triton), on random inputs at a few shapes:

- agreement with fastcascade.reference under the project's tolerance model: a float output's relative
  error against the reference run in float64 is at most 2x the error of the reference itself run in the
  same dtype (the worst of a few rounding patterns, see reference_errors), plus a floor of 16 units of the
  output dtype's precision; integer outputs (and row copies) must equal the reference exactly;
- forward and backward (the gradients of every differentiable input, with an upstream gradient that is
  not all ones);
- bitwise determinism: two runs on the same inputs give identical outputs and gradients;
- on CUDA, the time of one forward + backward (CUDA events) against the reference eager and, at the
  benchmark-sized shapes, torch.compile of the reference, and the achieved fraction of the device's copy
  bandwidth measured in the same run (bytes: each input read once, each output and gradient written once).

Shapes: small, awkward (1, 7, 4097, non-contiguous, channels_last, 3-D maps) and, on a GPU only,
benchmark-sized. ``quick=True`` (CI) keeps the small and awkward ones in fewer dtypes, times nothing
with torch.compile, and on a machine without a GPU sets TRITON_INTERPRET=1 for this process (before
the Triton kernels are imported) so that the Triton kernels run under the interpreter on CPU tensors.

All correctness rows run before any timing, so a run cut short still names a broken kernel; with a JSON
path the file is rewritten (atomically) after every row.

Modules: tolerance (the tolerance model, shared with the test suite), cases (one case table per op
family, shared with the tests and the compile gate), execute (running one case on one backend), run
(selftest() itself and the timing), report (rows, table, JSON), cli (``python -m fastcascade selftest``).
Note: ``fastcascade.selftest`` is the function, which shadows this package on the fastcascade namespace;
``import fastcascade.selftest.tolerance`` and ``from fastcascade.selftest import ...`` still reach the
package.
"""

from .report import SelftestResult, SelftestRow
from .run import selftest
from .tolerance import reference_errors, rel_err, tolerance

__all__ = ["SelftestResult", "SelftestRow", "reference_errors", "rel_err", "selftest", "tolerance"]
