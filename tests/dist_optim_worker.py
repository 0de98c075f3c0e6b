"""
Worker for tests/test_optim.py: trains a tiny GPT for a few steps with the sharded optimizers.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/dist_optim_worker.py --out-dir DIR

Each rank takes its slice of every global batch (no DDP wrapper: DistMuon/DistAdamW average the
gradients themselves) and writes its final weights and optimizer-state sizes to DIR/rank{r}.pt.
Without torchrun, `train(arch, world_size=1)` is the reference: one process accumulating
gradients over the same global batches.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `nanochat`

from nanochat.gpt import GPT, config_from_depth  # noqa: E402

ARCHS = ("nanochat", "qwen2")
STEPS = 3
GLOBAL_BATCH = 4  # rows per step, split over ranks (or micro-batches)
SEQ = 16
VOCAB = 200


def build_model(arch):
    # depth 3: three of each MLP matrix, so a Muon shape group does not divide over 2 ranks (padding path)
    cfg = config_from_depth(3, VOCAB, arch=arch, sequence_len=SEQ, n_embd=64, n_head=4, n_kv_head=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits output projections: make every gradient non-trivial
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def train(arch, rank=0, world_size=1, micro_batches=None):
    """STEPS optimizer steps. Under torch.distributed each rank takes rows rank::world_size... as a
    contiguous slice; a single process splits the batch into `micro_batches` and accumulates."""
    model = build_model(arch)
    optimizers = model.setup_optimizers(weight_decay=0.1)
    micro_batches = micro_batches or 1
    for step in range(STEPS):
        rows = global_batch(step)
        per_rank = GLOBAL_BATCH // world_size
        rows = rows[rank * per_rank:(rank + 1) * per_rank]
        for chunk in rows.chunk(micro_batches):
            loss = model(chunk[:, :-1], chunk[:, 1:]) / micro_batches
            loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    state_sizes = [sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
                   for opt in optimizers]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, state_sizes, [type(o).__name__ for o in optimizers]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {}
    for arch in ARCHS:
        weights, state_sizes, names = train(arch, rank, world)
        result[arch] = dict(weights=weights, state_sizes=state_sizes, optimizers=names)
    torch.save(result, os.path.join(args.out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
