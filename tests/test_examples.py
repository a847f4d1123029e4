"""The examples run end to end in their --quick mode and print their metric lines."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name, tmp_path):
    # From a temp cwd, so the example imports the installed package and writes nothing into the checkout;
    # one thread, as the suite shares its CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _score(pattern, out):
    m = re.search(pattern, out)
    assert m, f"no line matching {pattern!r} in:\n{out[-3000:]}"
    return [float(v) for v in m.groups()]


def test_segmentation_example(tmp_path):
    out = run_example("segmentation.py", tmp_path)
    miou, miou_tta = _score(r"fold 1 val mIoU: ([0-9.]+)  with TTA: ([0-9.]+)", out)
    # 3 classes: a model that learnt nothing (one class everywhere) scores at most 1/3.
    assert 0.4 < miou <= 1 and 0.4 < miou_tta <= 1, out[-2000:]
    _score(r"mean val mIoU over 1 fold\(s\): ([0-9.]+)  with TTA: ([0-9.]+)", out)


def test_fusion_example(tmp_path):
    out = run_example("fusion.py", tmp_path)
    (f1,) = _score(r"val macro F1: ([0-9.]+)", out)
    assert 0.4 < f1 <= 1, out[-2000:]    # chance is 0.25
    (ms,) = _score(r"inference latency: ([0-9.]+) ms/event", out)
    assert ms > 0
