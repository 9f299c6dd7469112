"""tools/gpu_smoke.py: its no-GPU path (the GPU path runs on a CUDA machine)."""
import os
import subprocess
import sys

import pytest
import torch
from d2_fixtures import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the smoke "
                    "test itself is the check there")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "gpu_smoke.py"), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gpu_smoke: no CUDA device is visible" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_the_same_steps_and_checks_pass_as_a_cpu_dry_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "gpu_smoke.py"), "--device", "cpu",
         "--iters", "2", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("gpu_smoke: passed: kept rows copied, fresh rows identical on the CPU and cpu"
            in proc.stdout)
    assert "2 iterations:" in proc.stdout
