"""Every user-facing entry point answers a wrong flag with one line on stderr and exit code 2."""

import importlib

import pytest

ENTRY_POINTS = ["scripts.tok_train", "scripts.tok_eval", "scripts.tok_extend", "scripts.base_train", "scripts.base_eval",
                "scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl", "scripts.chat_eval", "scripts.chat_cli",
                "scripts.chat_web", "scripts.export_hf", "scripts.extend_checkpoint", "nanochat.dataset",
                "nanochat.doctor", "nanochat.report"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_wrong_flag_is_a_one_line_error_with_exit_code_2(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--help" in err
    assert "--no-such-flag" in err or "required" in err  # a required argument may be reported first
