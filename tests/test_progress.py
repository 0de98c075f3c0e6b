"""Long jobs report progress through one helper: a live tqdm bar on a terminal, and plain lines (no carriage
returns, one per update, throttled) in logs and CI; only rank 0 reports under torchrun."""

import io

from nanochat.progress import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_log_every_update_is_its_own_line_without_carriage_returns():
    log = io.StringIO()
    for _ in progress(range(5), total=5, desc="shards", unit="shard", stream=log, log_every_s=0):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("shards:") for line in lines)
    assert "5/5" in lines[-1]  # the final state is always written


def test_in_a_log_updates_are_throttled_to_one_line_per_interval():
    log = io.StringIO()
    with progress(total=1000, desc="bytes", stream=log, log_every_s=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) <= 3 and "1000/1000" in lines[-1]  # start, (maybe one), and the final state


def test_on_a_terminal_the_bar_redraws_in_place():
    term = FakeTerminal()
    for _ in progress(range(3), total=3, desc="eval", stream=term):
        pass
    assert "\r" in term.getvalue()


def test_ranks_other_than_zero_stay_silent(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = io.StringIO()
    assert list(progress(range(3), total=3, desc="eval", stream=log, log_every_s=0)) == [0, 1, 2]
    assert log.getvalue() == ""
