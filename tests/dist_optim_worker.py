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


def train_toy(rank=0, world_size=1, micro_batches=1, force_all_reduce=False):
    """The optimizers alone on odd shapes: a (5, 3) matrix and a size-5 vector (dim 0 not divisible
    by 2: AdamW's replicated path), a size-4 vector (sharded path) and three same-shaped matrices for
    Muon (one Muon slot is padding). force_all_reduce: the backend "lacks" reduce_scatter_tensor (it
    raises, as on a backend without it), so the optimizers take their all_reduce fallback."""
    from nanochat import optim
    from nanochat.common import is_ddp
    real_reduce_scatter = optim.dist.reduce_scatter_tensor
    if force_all_reduce:
        def reduce_scatter_unsupported(*args, **kwargs):
            raise RuntimeError("reduce_scatter_tensor is not supported by this backend")
        optim.dist.reduce_scatter_tensor = reduce_scatter_unsupported
    g = torch.Generator().manual_seed(0)
    adam_params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g)),
                   torch.nn.Parameter(torch.randn(4, generator=g))]
    muon_params = [torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(3)]
    ddp = is_ddp()
    adamw = (optim.DistAdamW if ddp else optim.AdamW)(adam_params, lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    muon = (optim.DistMuon if ddp else optim.Muon)(muon_params, lr=0.05, momentum=0.95)
    for step in range(STEPS):
        data = torch.randn(GLOBAL_BATCH, 3, generator=torch.Generator().manual_seed(step))
        per_rank = GLOBAL_BATCH // world_size
        data = data[rank * per_rank:(rank + 1) * per_rank]
        for chunk in data.chunk(micro_batches):
            h = chunk @ adam_params[0].T + adam_params[1]  # (b, 5)
            h = torch.cat([h, adam_params[2][None].expand(h.size(0), 4)], dim=1)[:, :4]  # (b, 4)
            for w in muon_params:
                h = torch.tanh(torch.cat([h, h[:, :2]], dim=1) @ w)  # (b, 6) @ (6, 4)
            loss = (h ** 2).mean() / micro_batches
            loss.backward()
        adamw.step()
        muon.step()
        for p in adam_params + muon_params:
            p.grad = None
    optim.dist.reduce_scatter_tensor = real_reduce_scatter
    optim._REDUCE_SCATTER_OK = True
    return [p.detach().clone() for p in adam_params + muon_params]


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
    result["toy"] = train_toy(rank, world)
    result["toy_all_reduce"] = train_toy(rank, world, force_all_reduce=True)
    torch.save(result, os.path.join(args.out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
