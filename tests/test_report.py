"""
The report card: reset writes the header, stages log sections, generate assembles report.md with the
sections in stage order, a summary table filled from the logged metrics, the wall-clock time, and
PNG plots of the logged curves with labelled axes and units.
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
    report.log("Chat evaluation sft", [{"source": "sft"}, {"ARC-Easy": 0.41, "GSM8K": 0.05, "SpellingBee": 0.9},
                                       {"ChatCORE": 0.2}])
    report.log("Base model training", [{"depth": 4, "val_bpb": 1.23}, "trained on the embedded corpus"])
    report.log("Base model evaluation", [{"CORE": 0.11}])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.33, "Arithmetic": 0.6}])
    report.log("Tokenizer training", [{"vocab_size": 4096}])
    report.log_series("base loss: train", range(20), [3.0 - 0.1 * s for s in range(20)])
    report.log_series("base loss: val", [0, 10, 19], [3.1, 2.2, 1.3])
    report.log_series("val bpb", [0, 2_000_000, 4_000_000], [2.5, 1.4, 1.2],
                      x_label="tokens", y_label="val bpb (bits per byte)")


def test_reset_log_generate_makes_a_complete_report(report, tmp_path):
    report.reset()
    log_a_run(report)
    path = report.generate()
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
    # one plot per group, linked, a valid 800x500 PNG beside both copies
    for group, fname in (("base loss", "base-loss.png"), ("val bpb", "val-bpb.png")):
        assert f"![{group}]({fname})" in text
        assert png_size(os.path.join(os.path.dirname(path), fname)) == (800, 500)
        assert png_size(tmp_path / fname) == (800, 500)


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


def test_plots_label_their_axes_with_units(report, monkeypatch):
    import nanochat.report as report_module
    figures = {}

    def spy(title, *args, **kwargs):
        figures[title] = real(title, *args, **kwargs)
        return figures[title]
    real = report_module.plot_figure
    monkeypatch.setattr(report_module, "plot_figure", spy)
    report.reset()
    log_a_run(report)
    report.generate(copy_to_cwd=False)
    assert sorted(figures) == ["base loss", "val bpb"]
    (ax,) = figures["base loss"].axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss (nats per token)", "base loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]
    (ax,) = figures["val bpb"].axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("tokens", "val bpb (bits per byte)")
    assert "2M" in [t.get_text().replace(" ", "") for t in ax.get_xticklabels()]  # token counts in engineering units


def test_the_png_shows_the_curve(report):
    import matplotlib.image
    import numpy as np
    report.reset()
    report.log_series("train loss", range(50), [3.0 - 0.04 * s for s in range(50)])
    report.generate(copy_to_cwd=False)
    pixels = matplotlib.image.imread(os.path.join(report.report_dir, "train-loss.png"))[..., :3]
    line_colour = np.abs(pixels - [0.12, 0.47, 0.71]).max(axis=-1) < 0.05  # matplotlib's first colour
    assert line_colour.sum() > 500  # a line across the plot, not a dot
    rows, cols = line_colour.nonzero()
    # falling loss: the line's left end is higher on the image (smaller row) than its right end
    assert rows[cols < cols.min() + 20].mean() < rows[cols > cols.max() - 20].mean()


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
    assert main(["generate"]) == 0
    assert os.path.exists(tmp_path / "report.md")
    assert "report written" in capsys.readouterr().out
