"""
The benchmark tools in dev/ measure what they say: the nanochat reference runs from the given
checkout in its own process (never this repo's `nanochat`), tokens are counted the same way for
both engines, and the chat-server, decode-split and bandwidth benchmarks run end to end on tiny models.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from dev.nanochat_reference import ReferenceWorker, count_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GPT = textwrap.dedent('''
    import torch
    from dataclasses import dataclass

    @dataclass
    class GPTConfig:
        sequence_len: int = 64
        vocab_size: int = 64
        n_layer: int = 1
        n_head: int = 1
        n_kv_head: int = 1
        n_embd: int = 64

    class GPT(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.emb = torch.nn.Embedding(config.vocab_size, config.n_embd)
            self.head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)

        def init_weights(self):
            torch.nn.init.normal_(self.emb.weight)
            torch.nn.init.normal_(self.head.weight)

        def setup_optimizers(self):
            print("setup noise on stdout")  # the worker must keep this out of its answers
            return [torch.optim.SGD(self.parameters(), lr=0.1)]

        def estimate_flops(self):
            return 12345  # tells the test this file, not our nanochat, was imported

        def forward(self, x, y):
            logits = self.head(self.emb(x))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
''')


def test_the_reference_runs_from_its_checkout_in_its_own_process(tmp_path):
    (tmp_path / "nanochat").mkdir()
    (tmp_path / "nanochat" / "__init__.py").write_text("")
    (tmp_path / "nanochat" / "gpt.py").write_text(FAKE_GPT)
    worker = ReferenceWorker(str(tmp_path), "train", threads=1, depth=1, seq=8, batch=2, vocab=64, warmup=1)
    try:
        assert worker.info["flops_per_token"] == 12345
        answer = worker.ask("train 2")
        assert len(answer["seconds"]) == len(answer["cpu_seconds"]) == 2
        assert all(s > 0 for s in answer["seconds"])
    finally:
        worker.close()


def test_a_reference_path_without_nanochat_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no nanochat/gpt.py there.*git archive"):
        ReferenceWorker(str(tmp_path), "train")


def test_tokens_are_counted_until_each_row_samples_a_stop_id_inclusive():
    stops = {0}
    columns = [([5, 6], [1, 1]), ([0, 7], [1, 1]), ([9, 8], [0, 1]), ([9, 0], [0, 1]), ([9, 9], [0, 0])]
    assert count_tokens(iter(columns), 2, stops) == 2 + 2 + 1 + 1  # row 0 stops at step 2, row 1 at step 4


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chat_web_benchmark_reports_first_token_time_and_rates_per_client_count():
    out = run_tool("dev.bench_chat_web", "--depth", "1", "--vocab-size", "300", "--clients", "1,2",
                   "--requests-per-client", "1", "--max-tokens", "4")
    assert "1 client: time to first token median" in out
    assert "2 clients: time to first token median" in out and "aggregate" in out


def test_bandwidth_benchmark_reports_both_weight_precisions_against_the_limit():
    out = run_tool("dev.bench_decode_bandwidth", "--depth", "1", "--vocab-size", "512", "--threads", "1",
                   "--rounds", "1", "--new-tokens", "3", "--buffer-mb", "8")
    assert "fp32 weights:" in out and "bf16 weights:" in out and "of the bandwidth limit" in out
    assert "top-1 agreement" in out


def test_decode_split_benchmark_separates_weight_reads_from_the_per_op_cost():
    out = run_tool("dev.bench_decode_split", "--threads", "1", "--depth", "1", "--vocab-size", "300", "--rounds", "1",
                   "--new-tokens", "4")
    assert "decode step, real matrices:" in out and "16-wide matrices (per-op cost):" in out
    assert "reading the matrices:" in out and "MB of weights read per token" in out
    assert "sampling + host sync:" in out and "per generated token" in out


def test_train_benchmark_without_a_reference_prints_absolute_figures_and_no_ratio():
    out = run_tool("dev.bench_train", "--threads", "1", "--depth", "1", "--seq", "32", "--batch", "1",
                   "--vocab", "256", "--rounds", "1", "--steps", "1", "--warmup", "1")
    assert "full step" in out and "of it" in out  # fwd+bwd as a % of the matmul peak
    assert "full step, same run" not in out and "x (median" not in out  # no ratio without a reference


def test_engine_benchmark_without_a_reference_prints_absolute_figures_and_no_ratio():
    out = run_tool("dev.bench_engine", "--threads", "1", "--depth", "1", "--vocab-size", "300", "--batch-sizes", "1",
                   "--new-tokens", "4", "--repeats", "1", "--skip-no-cache")
    assert "engine (KV cache)" in out and "% of" in out
    assert "same run" not in out and "nanochat" not in out
