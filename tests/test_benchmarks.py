"""benchmarks/gpu.py is run on a lent GPU only now and then: its CPU smoke mode runs every one of its
code paths here (the tiny preset), so the script cannot break unnoticed between two GPUs. Its own
checks (fp32 forward against the CPU reference, a finite learner step, finite engine log-probs)
must pass; timings are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_in_its_cpu_smoke_mode():
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--cpu-smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["failed"] == []
    assert result["forward"]["ok"] and result["forward"]["fp32"]["max_abs_logprob_diff"] == 0.0
    assert result["learner"]["ok"] and result["learner"]["tokens_per_step"] > 0
    assert set(result["engine"]) >= {"batch_1", "batch_4", "ok"}
    assert result["engine"]["batch_4"]["tokens"] == 4 * 8  # every row its 8 tokens, no stop
    assert "skipped" in result["flash_attn"]  # no CUDA here
