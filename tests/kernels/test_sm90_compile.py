"""Every kernel variant the GPU runs compiles for Hopper (sm_90) on this CPU-only machine:
``sm90_compile_sweep.py`` (its docstring says how), in a process of its own with Triton's
interpreter off. The interpreter tests cannot catch code that Triton's compiler rejects."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SWEEP = Path(__file__).with_name("sm90_compile_sweep.py")


def test_every_gpu_kernel_variant_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, str(SWEEP)], capture_output=True, text=True, env=env, timeout=3000)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
    assert r.returncode == 0, r.stderr[-3000:]
    compiled = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    # weight-only: 10 formats x 2 dtypes x their configs; A8W8 and the activation kernels; the fold
    assert len(compiled) >= 150 and r.stdout.rstrip().endswith("compiled for sm_90"), r.stdout[-2000:]
