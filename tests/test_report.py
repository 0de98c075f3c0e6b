"""
The report card: reset writes the header, stages log sections, generate assembles report.md with the
sections in stage order, a summary table filled from the logged metrics, the wall-clock time, and
valid PNG plots of the logged curves.
"""

import os
import struct

import pytest

from nanochat.report import DummyReport, get_report, main


@pytest.fixture
def report(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    return get_report()


def png_size(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def log_a_run(report):
    report.log("Chat evaluation sft", [{"source": "sft"}, {"ARC-Easy": 0.41, "GSM8K": 0.05, "SpellingBee": 0.9}, {"ChatCORE": 0.2}])
    report.log("Base model training", [{"depth": 4, "val_bpb": 1.23}, "trained on the embedded corpus"])
    report.log("Base model evaluation", [{"CORE": 0.11}])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.33, "Arithmetic": 0.6}])
    report.log("Tokenizer training", [{"vocab_size": 4096}])
    report.log_series("base loss: train", range(20), [3.0 - 0.1 * s for s in range(20)])
    report.log_series("base loss: val", [0, 10, 19], [3.1, 2.2, 1.3])


@pytest.mark.parametrize("use_matplotlib", [False, True])
def test_reset_log_generate_makes_a_complete_report(report, tmp_path, use_matplotlib):
    report.reset()
    log_a_run(report)
    path = report.generate(use_matplotlib=use_matplotlib)
    text = open(path).read()
    assert open(tmp_path / "report.md").read() == text  # copied to the working directory
    # header
    for needle in ("# nanochat report card", "git: commit", "CPU:", "versions: python", "torch", "tiktoken", "code:"):
        assert needle in text
    # sections in stage order, whatever order they were logged in
    order = ["## Tokenizer training", "## Base model training", "## Base model evaluation",
             "## Chat evaluation mid", "## Chat evaluation sft"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    assert "- val_bpb: 1.2300" in text and "trained on the embedded corpus" in text
    # summary table from the logged metrics, '-' where missing
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert rows["CORE"] == ["0.1100", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3300", "0.4100", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0500", "-"]
    assert rows["SpellingBee"] == ["-", "-", "0.9000", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.2000", "-"]
    assert rows["MMLU"] == ["-", "-", "-", "-"] and rows["HumanEval"] == ["-", "-", "-", "-"]
    assert rows["Arithmetic"] == ["-", "0.6000", "-", "-"]
    assert "Total wall clock time:" in text
    # the loss plot is linked and is a valid PNG, beside both copies
    assert "![base loss](base-loss.png)" in text
    width, height = png_size(os.path.join(os.path.dirname(path), "base-loss.png"))
    assert (width, height) == (640, 400)
    assert png_size(tmp_path / "base-loss.png") == (640, 400)


def test_logging_a_section_again_replaces_it(report):
    report.reset()
    report.log("Chat SFT", [{"val_loss": 2.0}])
    report.log("Chat SFT", [{"val_loss": 1.5}])
    text = open(report.generate(copy_to_cwd=False)).read()
    assert text.count("## Chat SFT") == 1 and "val_loss: 1.5" in text


def test_reset_clears_the_previous_run(report):
    report.reset()
    report.log("Chat RL", [{"GSM8K": 0.3}])
    report.reset()
    text = open(report.generate(copy_to_cwd=False)).read()
    assert "## Chat RL" not in text


def test_builtin_png_draws_the_curve():
    from nanochat.report import plot_png_builtin
    import zlib
    data = plot_png_builtin([("loss", [0, 1, 2], [3.0, 2.0, 1.0])], width=100, height=80)
    assert struct.unpack(">II", data[16:24]) == (100, 80)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    assert len(raw) == 80 * (1 + 100 * 3)
    assert bytes((31, 119, 180)) in raw  # the series colour is on the canvas


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log("Chat SFT", [{"x": 1}])
    assert not os.path.exists(tmp_path / "base" / "report")


def test_command_line_reset_and_generate(report, tmp_path, capsys):
    assert main(["reset"]) == 0
    assert main(["generate", "--no-matplotlib"]) == 0
    assert os.path.exists(tmp_path / "report.md")
    assert "report written" in capsys.readouterr().out
