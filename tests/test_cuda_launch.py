"""Launch configurations of the CUDA C++ kernels against the hardware limits, for every shape the ops accept.

The .cu files launch with the host arithmetic in csrc/<family>/<op>_launch.h; the same headers are
compiled into every build (CPU-only too) and exposed as fastcascade._C._launch_config, so these sweeps
need no GPU: threads per block a warp multiple <= 1024, grid.x <= 2^31 - 1, grid.y/z <= 65535, static +
dynamic shared memory <= 48 KB unless the configuration opts in, then <= the device's opt-in limit
(227 KB on H100/H200). A shape the configuration cannot launch must come back with the error the op
raises, and that error must state the limit the sweep finds.
"""

import importlib

import pytest

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
