"""benchmarks/trellis_gpu.py (the trellis part of the one-shot GPU check, benchmarks/device_check.sh) dry-run on the
CPU under the Triton interpreter at tiny shapes: every section runs, the Triton search equals the torch search, and
the fused product equals the reference, so a session lent a GPU does not spend its one call on a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_of_every_section(tmp_path):
    out = tmp_path / "trellis_gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trellis_gpu.py"), "--device", "cpu", "--out",
                        str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(row["ok"] for row in res["product"]) and len(res["product"]) == 4
    assert res["targets"]["search_equals_torch"]["pass"]
    g = res["gptq"]
    assert g["trellis3_error"] < g["scalar_int3_error"]  # the code's point: less error at the same bits
    # without the interpreter on a CPU it refuses in one line instead of measuring Python
    env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trellis_gpu.py"), "--device", "cpu"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stdout
