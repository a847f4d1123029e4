"""Launch configurations of the CUDA C++ kernels against the hardware limits, for every shape the ops accept.

The .cu files launch with the host arithmetic in csrc/<family>/<op>_launch.h; the same headers are
compiled into every build (CPU-only too) and exposed as fastcascade._C._launch_config, so these sweeps
need no GPU: threads per block a warp multiple <= 1024, grid.x <= 2^31 - 1, grid.y/z <= 65535, static +
dynamic shared memory <= 48 KB unless the configuration opts in, then <= the device's opt-in limit
(227 KB on H100/H200). A shape the configuration cannot launch must come back with the error the op
raises, and that error must state the limit the sweep finds. The gpu-marked tests at the end run the
ops at shapes that sit on those limits.
"""

import importlib
import importlib.util
import pathlib
import re
import shutil
import subprocess

import pytest
import torch
from conftest import gpu, needs_cuda, random_logits, rel_err, seeded

import fastcascade as fc
from fastcascade import reference

_C = importlib.import_module("fastcascade._C")

KB48 = 48 * 1024
H200_OPTIN = 232_448  # sharedMemPerBlockOptin of sm_90 (H100, H200): 227 KB
# (SMs, sharedMemPerBlockOptin) of devices the release builds target: H200, A100 (sm_80), RTX 3090 (sm_86)
DEVICES = {"h200": (132, H200_OPTIN), "a100": (108, 166_912), "rtx3090": (82, 101_376)}
ACC = {"fp32": 4, "fp64": 8}  # accumulator bytes: float32 for fp32/fp16/bf16 inputs, float64 for fp64


def config(kernel, dev="h200", **args):
    sms, optin = DEVICES[dev]
    return _C._launch_config(kernel, {**args, "sms": sms, "smem_optin": optin})


def assert_launchable(cfg, dev="h200", what=""):
    """The hardware limits of one launch (cudaLaunchKernel would refuse anything else)."""
    assert cfg["error"] == "", f"{what}: {cfg['error']}"
    bx, by, bz = cfg["block"]
    gx, gy, gz = cfg["grid"]
    assert min(bx, by, bz) >= 1 and bz <= 64, (what, cfg)
    assert cfg["threads"] == bx * by * bz <= 1024 and cfg["threads"] % 32 == 0, (what, cfg)
    assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535, (what, cfg)
    smem = cfg["static_smem"] + cfg["dynamic_smem"]
    if cfg["opt_in"]:  # opting in only where the default budget is too small, and within the device's
        assert KB48 < smem <= cfg["smem_limit"] == DEVICES[dev][1] <= H200_OPTIN, (what, cfg)
    else:
        assert smem <= cfg["smem_limit"] == KB48, (what, cfg)


def largest_accepted(kernel, key, dev, stop, **args):
    """Sweeps args[key] = 1, 2, ... and returns the last value that launches: every value up to it must
    pass assert_launchable; the next 64 values and `stop` must be refused."""
    for v in range(1, stop + 1):
        cfg = config(kernel, dev, **{key: v}, **args)
        if cfg["error"]:
            break
        assert_launchable(cfg, dev, f"{kernel} {key}={v} {args}")
    else:
        raise AssertionError(f"{kernel}: every {key} up to {stop} launches; sweep further")
    last = v - 1
    for v in [*range(last + 1, last + 65), stop]:
        assert config(kernel, dev, **{key: v}, **args)["error"], (
            f"{kernel} {key} = {v} launches after {key} = {last + 1} was refused: {args}"
        )
    return last


def refusal(kernel, dev="h200", **args):
    cfg = config(kernel, dev, **args)
    assert cfg["error"], f"{kernel} {args} should be refused"
    return cfg["error"]


# ---------------------------------------------------------------------------------------------
# routing, metrics, focal


def test_copy_rows_grid_is_one_dimensional_for_any_row():
    """gather_rows / scatter_rows: threadIdx.x walks a row, threadIdx.y the rows, the grid strides over
    rows in x only, so no row length, however long, puts blocks in grid.y."""
    for M in [1, 7, 4097, 2**31, 2**40]:
        for row_bytes in [1, 2, 3, 4, 12, 16, 17, 1024, 4096, 2**20, 2**31 + 8, 2**40]:
            for so, do in [(0, 0), (1, 0), (0, 2), (4, 4), (8, 0)]:
                cfg = config("copy_rows", M=M, row_bytes=row_bytes, src_offset=so, dst_offset=do)
                assert_launchable(cfg, what=f"M={M} row_bytes={row_bytes} offsets={so},{do}")
                v = cfg["vec"]
                assert row_bytes % v == 0 and so % v == 0 and do % v == 0 and cfg["row_vecs"] * v == row_bytes
                assert cfg["grid"][1:] == (1, 1) and cfg["grid"][0] <= 132 * 16


def test_partition_and_row_kernels():
    for N in [1, 511, 512, 513, 2**31, 2**40]:
        assert_launchable(config("route_rows", N=N), what=f"route_rows N={N}")
        for B in list(range(1, 1100, 7)) + [1022, 1023, 1024, 2**20]:
            cfg = config("partition", N=N, B=B)
            if cfg["by_sort"]:
                assert B + 1 > 1024
                continue
            assert_launchable(cfg, what=f"partition N={N} B={B}")
            assert cfg["grid"][0] * 8 >= cfg["ntiles"] == -(-N // 512)


def test_confusion_matrix_every_class_count():
    for C in range(1, 46341):
        for N in [1, 2**31 + 5] if C % 997 == 1 else [1000]:
            cfg = config("confusion_matrix", N=N, C=C)
            assert_launchable(cfg, what=f"confusion C={C} N={N}")
            assert cfg["replicas"] in (0, 1, 2, 4, 8)
            assert cfg["grid"][0] >= (N >> 31) + 1  # no uint32 shared counter can overflow


@pytest.mark.parametrize("acc", ACC)
def test_focal_passes(acc):
    for n in [1, 255, 256, 257, 1024, 2**31, 2**45]:
        for kernel, key in [("sigmoid_focal", "N"), ("softmax_focal", "R")]:
            cfg = config(kernel, **{key: n}, acc_bytes=ACC[acc])
            assert_launchable(cfg, what=f"{kernel} {key}={n}")
            assert cfg["static_smem"] == 32 * ACC[acc] and cfg["grid"][0] <= 132 * 8
    assert config("sigmoid_focal", N=2048 * 132 * 8, acc_bytes=4)["grid"][0] == 132 * 8
    assert_launchable(config("focal_finalize"), what="finalize")


def test_unknown_kernel_and_missing_argument_are_named():
    with pytest.raises(ValueError, match="route_rows"):
        _C._launch_config("no_such_kernel", {"sms": 1, "smem_optin": KB48})
    with pytest.raises(KeyError, match="'B'"):
        config("partition", N=1)


# ---------------------------------------------------------------------------------------------
# dice focal


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("acc", ACC)
def test_dice_focal_forward_every_class_count(dev, acc):
    """Each thread keeps 2C class sums in shared memory next to block_sum's static warp sums: static +
    dynamic must fit (the opt-in budget when 32 threads overflow 48 KB), and the refusal names the limit."""
    acc_bytes = ACC[acc]
    top = largest_accepted("dice_focal_forward", "C", dev, 2000, B=2, S=4097, acc_bytes=acc_bytes)
    msg = refusal("dice_focal_forward", dev, B=2, C=top + 1, S=4097, acc_bytes=acc_bytes)
    assert f"at most {top} classes" in msg and f"C = {top + 1}" in msg and "backend='triton'" in msg, msg
    assert ("float64" in msg) == (acc == "fp64"), msg
    assert top >= (96 if acc == "fp64" else 192)  # what the op has promised since its first version


@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("C", [1, 2, 3, 10, 12, 24, 48, 96, 185, 192, 400])
def test_dice_focal_forward_grid(acc, C):
    acc_bytes = ACC[acc]
    for B, S in [(1, 1), (3, 4096), (5, 4097), (65535, 1), (2, 2**33)]:
        cfg = config("dice_focal_forward", B=B, C=C, S=S, acc_bytes=acc_bytes)
        assert_launchable(cfg, what=f"B={B} S={S}")
        assert cfg["grid"][:2] == (cfg["nchunk"], B) and cfg["nchunk"] == -(-S // 4096)
    assert "65535 images" in refusal("dice_focal_forward", B=65536, C=C, S=7, acc_bytes=acc_bytes)


def _warp_bank_conflicts(first_word, acc_bytes):
    """Largest number of lanes of one memory transaction that hit the same 4-byte bank, for lanes whose
    accesses start at the given 4-byte word (8-byte accesses go as two half-warps, two banks each)."""
    words = acc_bytes // 4
    phases = [first_word] if words == 1 else [first_word[:16], first_word[16:]]
    worst = 0
    for lanes in phases:
        hits = {}
        for w in lanes:
            for k in range(words):
                hits[(w + k) % 32] = hits.get((w + k) % 32, 0) + 1
        worst = max([worst, *hits.values()])
    return worst


@pytest.mark.parametrize("acc", ACC)
def test_dice_focal_class_sums_read_without_bank_conflicts(acc):
    """The block adds its per-thread class sums one class per thread: lane j reads row j of the
    [2C][acc_ld] array, so lanes are acc_ld apart; a multiple of 32 serialises the warp 32 ways."""
    acc_bytes = ACC[acc]
    for C in range(1, 1000):
        cfg = config("dice_focal_forward", B=1, C=C, S=4097, acc_bytes=acc_bytes)
        if cfg["error"]:
            break
        ld = cfg["acc_ld"]
        assert ld >= cfg["threads"] and cfg["dynamic_smem"] == 2 * C * ld * acc_bytes, cfg
        lanes = range(min(32, 2 * C))
        for i in (0, 1, cfg["threads"] - 1):  # the column every lane reads in one step of the sum
            first = [(j * ld + i) * acc_bytes // 4 for j in lanes]
            assert _warp_bank_conflicts(first, acc_bytes) == 1, f"C={C} ld={ld} column {i}"


def test_dice_focal_chunks_and_backward_grids():
    for B in [1, 7, 65535]:
        assert_launchable(config("dice_focal_chunks", B=B), what=f"chunks B={B}")
    for B, S in [(1, 1), (4, 4097), (65535, 2**20), (2**20, 2**20)]:
        cfg = config("dice_focal_backward", B=B, S=S)
        assert_launchable(cfg, what=f"backward B={B} S={S}")
        assert cfg["grid"][0] <= 132 * 8


# ---------------------------------------------------------------------------------------------
# pixel adapter


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_pixel_adapter_every_bottleneck(dev, acc, direction):
    """The tile's [tile][r] arrays (one forward, three backward) in dynamic shared memory next to the
    backward's static red[] of doubles: every r up to the refusal must launch, and r is never capped
    below the widest the device can hold at one position per block."""
    kernel, acc_bytes = f"pixel_adapter_{direction}", ACC[acc]
    top = largest_accepted(kernel, "r", dev, 80_000, T=4097, acc_bytes=acc_bytes)
    arrays, static = (3, 256 * 8) if direction == "backward" else (1, 0)
    assert top == (DEVICES[dev][1] - static) // (arrays * acc_bytes)
    msg = refusal(kernel, dev, T=4097, r=top + 1, acc_bytes=acc_bytes)
    assert f"r = {top + 1}" in msg and f"at most {top}" in msg and "backend='triton'" in msg, msg


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_pixel_adapter_positions(direction):
    kernel = f"pixel_adapter_{direction}"
    for r in [1, 64, 256, 341, 1024, 4000]:
        for T in [1, 15, 16, 17, 4097, 2**31 - 1]:
            cfg = config(kernel, T=T, r=r, acc_bytes=4)
            assert_launchable(cfg, what=f"r={r} T={T}")
            assert cfg["grid"][0] == -(-T // cfg["tile"]) and 1 <= cfg["tile"] <= 16
        # more tiles than grid.x can count: refused, not launched with a truncated grid
        tile = config(kernel, T=1, r=r, acc_bytes=4)["tile"]
        assert "positions" in refusal(kernel, T=(2**31) * tile, r=r, acc_bytes=4)


# ---------------------------------------------------------------------------------------------
# pooled adapter


@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_pooled_adapter_every_width(acc, direction):
    kernel, acc_bytes = f"pooled_adapter_{direction}", ACC[acc]
    r_per = 2 if direction == "backward" else 1
    top_c = largest_accepted(kernel, "C", "h200", 40_000, B=3, r=1, acc_bytes=acc_bytes)
    assert top_c == (H200_OPTIN // acc_bytes - r_per) // 2
    for C in [1, 64, 512, 4096, top_c // 2]:
        top_r = largest_accepted(kernel, "r", "h200", 60_000, B=3, C=C, acc_bytes=acc_bytes)
        assert top_r == (H200_OPTIN // acc_bytes - 2 * C) // r_per
        msg = refusal(kernel, B=3, C=C, r=top_r + 1, acc_bytes=acc_bytes)
        assert f"C = {C}" in msg and f"r = {top_r + 1}" in msg and "backend='triton'" in msg, msg
    for B in [1, 2**31 - 1]:
        assert_launchable(config(kernel, B=B, C=64, r=64, acc_bytes=acc_bytes), what=f"B={B}")
    assert "samples" in refusal(kernel, B=2**31, C=64, r=64, acc_bytes=acc_bytes)


# ---------------------------------------------------------------------------------------------
# the compiled kernels: static shared memory as the configurations count it

# Every kernel in the extension and the configuration it is launched with (sizes that launch;
# acc_bytes is the kernel's own).
LAUNCHED_WITH = {
    "dice_focal_forward_kernel": ("dice_focal_forward", {"B": 1, "C": 4, "S": 1, "acc_bytes": 0}),
    "dice_focal_chunks_kernel": ("dice_focal_chunks", {"B": 1}),
    "dice_focal_backward_kernel": ("dice_focal_backward", {"B": 1, "S": 1}),
    "pixel_adapter_fwd_kernel": ("pixel_adapter_forward", {"T": 1, "r": 1, "acc_bytes": 0}),
    "pixel_adapter_bwd_kernel": ("pixel_adapter_backward", {"T": 1, "r": 1, "acc_bytes": 0}),
    "pooled_adapter_fwd_kernel": ("pooled_adapter_forward", {"B": 1, "C": 1, "r": 1, "acc_bytes": 0}),
    "pooled_adapter_bwd_kernel": ("pooled_adapter_backward", {"B": 1, "C": 1, "r": 1, "acc_bytes": 0}),
    "sigmoid_focal_kernel": ("sigmoid_focal", {"N": 1, "acc_bytes": 0}),
    "softmax_focal_kernel": ("softmax_focal", {"R": 1, "acc_bytes": 0}),
    "softmax_focal_prob_kernel": ("softmax_focal", {"R": 1, "acc_bytes": 0}),  # the same launch and block sums
    "finalize_kernel": ("focal_finalize", {}),
    "confusion_kernel": ("confusion_matrix", {"N": 1, "C": 2}),
    "partition_tiles_kernel": ("partition", {"N": 1, "B": 2}),
    "copy_rows_kernel": ("copy_rows", {"M": 1, "row_bytes": 16, "src_offset": 0, "dst_offset": 0}),
    "partition_offsets_kernel": ("route_rows", {"N": 1}),
    "route_threshold_kernel": ("route_rows", {"N": 1}),
    "route_argmax_kernel": ("route_rows", {"N": 1}),
    "route_confident_kernel": ("route_rows", {"N": 1}),
    "vote_kernel": ("route_rows", {"N": 1}),
}


def _cuobjdump():
    found = shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")
    if found is None and spec is not None and spec.origin:  # Triton ships one with its ptxas
        bundled = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.is_file() else None
    return found


@pytest.mark.skipif(not _C.with_cuda, reason="a CPU-only build has no CUDA kernels")
@pytest.mark.skipif(_cuobjdump() is None, reason="needs cuobjdump (CUDA toolkit or Triton's bundled one)")
def test_compiled_static_shared_memory_matches_the_configurations():
    """The static shared bytes the compiler gave each kernel (cuobjdump -res-usage of the built
    extension; sm_80+ adds the 1 KB the driver reserves to any kernel using shared memory) are the
    ones its configuration adds to the dynamic bytes; and no kernel launches without a configuration."""
    out = subprocess.run(
        [_cuobjdump(), "-res-usage", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    compiled = {}  # (kernel, accumulator bytes) -> most static shared bytes over instantiations and archs
    for arch, section in re.findall(r"arch = sm_(\d+)(.*?)(?=arch = sm_|\Z)", out, re.DOTALL):
        reserved = 1024 if int(arch) >= 80 else 0
        for name, shared in re.findall(r"Function (\S+):\s+REG:\d+ STACK:\d+ SHARED:(\d+)", section):
            kernel = next((k for k in LAUNCHED_WITH if k in name), None)
            assert kernel is not None, f"kernel {name} has no launch configuration in LAUNCHED_WITH"
            template = name.split(kernel, 1)[1]
            acc_bytes = 8 if template.startswith("Id") else 4  # a double first template argument
            static = max(0, int(shared) - reserved)
            compiled[kernel, acc_bytes] = max(compiled.get((kernel, acc_bytes), 0), static)
    assert {k for k, _ in compiled} == set(LAUNCHED_WITH)
    for (kernel, acc_bytes), static in sorted(compiled.items()):
        name, args = LAUNCHED_WITH[kernel]
        cfg = config(name, **{k: acc_bytes if k == "acc_bytes" else v for k, v in args.items()})
        assert static == cfg["static_smem"], (
            f"{kernel} ({acc_bytes}-byte sums): compiled {static} B, config {cfg}"
        )


# ---------------------------------------------------------------------------------------------
# on a GPU: the ops at the shapes on those limits


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "dtype,C",
    [
        (torch.float32, 24),
        (torch.float32, 48),
        (torch.float32, 192),
        (torch.float32, 600),
        (torch.float64, 12),
        (torch.float64, 96),
        (torch.float64, 300),
    ],
)
def test_dice_focal_cuda_at_the_shared_memory_edges(dtype, C):
    """Class counts whose class sums fill 48 KB (with block_sum's warp sums on top), and ones that opt in."""
    gen = seeded("dice-edges", C, dtype)
    x = random_logits((2, C, 4100), generator=gen).cuda()
    t = torch.randint(0, C, (2, 4100), generator=gen).cuda()
    out = {}
    for backend, dt in (("cuda", dtype), ("torch", torch.float64)):
        xr = x.to(dt).requires_grad_(True)
        loss = fc.dice_focal_loss(xr, t, backend=backend)
        (loss * 1.375).backward()
        out[backend] = (loss.detach(), xr.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(out["cuda"][0], out["torch"][0]) < tol
    assert rel_err(out["cuda"][1], out["torch"][1]) < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("r", [246, 256, 341, 512, 1024, 5000])
def test_pixel_adapter_cuda_at_the_shared_memory_edges(r):
    """Bottlenecks whose backward tile fills 48 KB next to the static red[] of doubles; one that opts in."""
    gen = seeded("pixel-edges", r)
    T, C = 37, 24
    x, gy = (torch.randn(T, C, generator=gen, dtype=torch.float64) for _ in range(2))
    dw, db = (
        torch.randn(r, C, generator=gen, dtype=torch.float64) / C**0.5,
        torch.randn(r, generator=gen, dtype=torch.float64),
    )
    uw, ub = (
        torch.randn(C, r, generator=gen, dtype=torch.float64) / r**0.5,
        torch.randn(C, generator=gen, dtype=torch.float64),
    )
    args = [v.float().cuda() for v in (x, dw, db, uw, ub)]
    y = torch.ops.fastcascade.pixel_adapter(*args, None, 1, 0.0, 0)
    grads = torch.ops.fastcascade._pixel_adapter_backward(gy.float().cuda(), *args, None, 1, 0.0, 0)
    leaves = [v.clone().requires_grad_(True) for v in (x, dw, db, uw, ub)]
    ref = reference.pixel_adapter(*leaves, activation="gelu")
    ref.backward(gy)
    assert rel_err(y, ref) < 1e-5
    for got, leaf in zip(grads[:5], leaves):
        assert rel_err(got, leaf.grad) < 1e-5
