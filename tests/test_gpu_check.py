"""dev/gpu_check.sh, the one-call GPU check, rehearsed on CPU: --dry-run runs every check of the real one
(data, tokenizer, training, resume, mid/SFT/eval, bf16 engine decode, torchrun) at toy sizes and reports
each as a row; without a GPU the real check refuses in one line instead of half-running."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "dev", "gpu_check.sh")


def run_check(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_passes_every_check_and_writes_a_summary(tmp_path):
    summary = tmp_path / "summary.json"
    proc = run_check("--dry-run", "--work-dir", str(tmp_path / "work"), "--json", str(summary))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads(summary.read_text())["checks"]
    names = [c["name"] for c in checks]
    assert len(names) == 7 and names[0] == "data + tokenizer" and names[-1] == "torchrun", names
    assert all(c["status"] == "ok" for c in checks), checks
    resume = next(c for c in checks if c["name"] == "checkpoint resume")
    assert "largest difference 0," in resume["figures"]  # fp32 on CPU: a resumed run is bit-exact
    assert "| check | status | figures | time |" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_real_check_refuses_without_a_gpu_in_one_line(tmp_path):
    proc = run_check("--work-dir", str(tmp_path / "work"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--dry-run" in proc.stderr
    assert not (tmp_path / "work").exists()  # refused before creating anything
