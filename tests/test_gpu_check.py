"""`benchmarks/gpu_check.sh --dry-run`: the GPU session's script runs end to end at toy sizes on
the CPU and prints every figure the GPU run must give, so it cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_every_figure():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    throughput = {r["backbone"]: r for r in rows if "backbone" in r}
    assert throughput.keys() == {"resnet50", "senet50", "vgg16"}
    for r in throughput.values():
        assert {"fp32_nchw", "bf16_nhwc"} <= r["variants_img_s"].keys()
        assert min(r["variants_img_s"].values()) > 0 and r["plain_img_s"] > 0
        assert 0 <= r["data_wait_fraction"] < 1
        assert r["peak_gpu_mem_gib"] is None   # no GPU here; a number on CUDA
    checks = {r["check"]: r for r in rows if "check" in r}
    assert checks["lopo_mode_b"]["subjects"] == 4 and checks["lopo_mode_b"]["wall_s"] > 0
    overhead = checks["torchrun_overhead"]
    assert overhead["plain_wall_s"] > 0 and overhead["torchrun_wall_s"] > 0
    assert overhead["plain_img_s"] > 0 and overhead["torchrun_img_s"] > 0
