"""The doctor says whether model-written code (HumanEval in chat_eval) can run confined on this host; a run
that will evaluate HumanEval (speedrun's GPU profile passes --require-sandbox) stops at the doctor, before
any training, when the kernel cannot confine it, instead of failing at its eval stage hours later."""

import pytest

from nanochat import doctor, sandbox
from nanochat.tokenizer import CharTokenizer

UNCONFINED = {"confined": False, "seccomp_bpf": False, "landlock_abi": 0, "namespaces": False,
              "network_namespace": False, "disk_quota": False, "no_new_privs": False,
              "unsafe_execution_allowed": False, "problems": ["no Landlock in this kernel"]}


@pytest.fixture
def base_with_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    CharTokenizer.train_from_iterator(["hello world, the doctor is in"]).save(str(tmp_path / "tokenizer"))
    return tmp_path


def sandbox_status(capsys):
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("sandbox ")]
    assert len(rows) == 1, rows
    return rows[0][1]


def test_a_confining_host_is_reported_ok(base_with_tokenizer, capsys):
    if not sandbox.sandbox_capabilities()["confined"]:
        pytest.skip("this kernel cannot confine model-written code")
    assert doctor.main(["--require-sandbox"]) == 0
    assert sandbox_status(capsys) == doctor.OK


def test_an_unconfining_host_is_a_warning_or_with_require_sandbox_a_mismatch(base_with_tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: UNCONFINED)
    assert doctor.main([]) == 0
    assert sandbox_status(capsys) == doctor.WARN
    assert doctor.main(["--require-sandbox"]) == 1
    assert sandbox_status(capsys) == doctor.FAIL
