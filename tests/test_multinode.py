"""
Multi-node training, rehearsed on loopback: two torchrun launchers, each `--nnodes 2 --nproc_per_node 1`,
meet through the c10d rendezvous (the command the README gives for 2 nodes x 8 GPUs, scaled down) and run
a few base_train steps. The weights equal those of one node running 2 processes, and both runs split the
data and the work the same way (the second node is a real rank, not a bystander).
"""

import os
import random
import socket
import subprocess
import sys

import pytest

from nanochat import dataset
from nanochat.tokenizer import CharTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
         "--eval-tokens", "128", "--sample-every", "0", "--device", "cpu", "--buffer-docs", "8",
         "--num-iterations", "3", "--eval-every", "0", "--save-every", "0"]


@pytest.fixture()
def base(tmp_path):
    """<base> with 3 small parquet shards (2 train, 1 val) and a char tokenizer."""
    rng = random.Random(0)
    words = "the a cat dog sat on mat and ran far away big small red blue".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(150)]
    os.makedirs(tmp_path / "base_data")
    for s in range(3):
        dataset.write_shard(str(tmp_path / "base_data" / dataset.shard_name(s)), docs[s * 50:(s + 1) * 50],
                            row_group_docs=10)
    CharTokenizer.train_from_iterator(docs).save(str(tmp_path / "tokenizer"))
    return tmp_path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(base, tag, torchrun_flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_flags, "-m", "scripts.base_train",
                             "--", *TRAIN, "--model-tag", tag], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    return out


def weights(base, tag):
    from safetensors.torch import load_file
    steps = sorted((base / "base_checkpoints" / tag).glob("step_*/COMPLETE"))
    assert steps, tag
    return load_file(str(steps[-1].parent / "model.safetensors"))


def test_two_nodes_of_one_process_train_the_same_weights_as_one_node_of_two(base):
    one_node = finish(launch(base, "one_node", ["--standalone", "--nproc_per_node=2"]))
    port = free_port()
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nanochat-rehearsal"]
    nodes = [launch(base, "two_nodes", rdzv) for _ in range(2)]
    outs = [finish(p) for p in nodes]
    assert "2 ranks" in one_node and any("2 ranks" in out for out in outs), outs[0][-2000:]
    a, b = weights(base, "one_node"), weights(base, "two_nodes")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    ckpt = sorted((base / "base_checkpoints" / "two_nodes").glob("step_*"))[-1]
    assert sorted(p.name for p in ckpt.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
