"""speedrun.sh's smoke profile: every stage script runs for real, in order, with tiny settings, and
the artifacts fit together (tokenizer -> base -> mid -> sft -> rl checkpoints -> report card).
A rerun resumes: finished stages are skipped, and a bad profile name is a one-line error."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_speedrun(base_dir, profile="smoke", timeout=600):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_PROFILE=profile, SKIP_SETUP="1",
               PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], cwd=str(base_dir), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("speedrun_smoke")
    proc = run_speedrun(base_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base_dir, proc.stdout


def test_smoke_profile_runs_every_stage_in_order(smoke_run):
    _, out = smoke_run
    stages = ["data", "tok_train", "tok_eval", "doctor", "base_train", "base_eval", "mid_train", "mid_eval",
              "chat_sft", "sft_eval", "chat_rl", "rl_eval"]
    positions = [out.find(f"== {s}: done") for s in stages]
    assert all(p >= 0 for p in positions), dict(zip(stages, positions))
    assert positions == sorted(positions)


def test_smoke_profile_leaves_loadable_checkpoints_and_a_report(smoke_run):
    base_dir, _ = smoke_run
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
    try:
        from nanochat.checkpoint_manager import load_model
        fingerprints = set()
        for source in ("base", "mid", "sft", "rl"):
            model, tok, meta = load_model(source, "cpu")
            assert model.config.vocab_size == tok.get_vocab_size()
            fingerprints.add(meta["tokenizer_fingerprint"])
        assert len(fingerprints) == 1  # one tokenizer all the way through
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR", None)
    report = (base_dir / "report.md").read_text()
    for section in ("Base model training", "Midtraining", "SFT"):
        assert section.lower() in report.lower(), section
    assert "Total wall clock time" in report or "wall clock" in report.lower()
    for stage in ("base_train", "chat_sft"):
        assert (base_dir / "logs" / f"{stage}.log").stat().st_size > 0  # each stage logged to a file too


def test_rerun_skips_finished_stages(smoke_run):
    base_dir, _ = smoke_run
    proc = run_speedrun(base_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== base_train: already done" in proc.stdout and "== chat_sft: already done" in proc.stdout
    assert "== base_train: done" not in proc.stdout


def test_unknown_profile_is_a_one_line_error(tmp_path):
    proc = run_speedrun(tmp_path, profile="tpu", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "NANOCHAT_PROFILE must be" in proc.stderr
