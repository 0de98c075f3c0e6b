"""Muon / AdamW, single-process and sharded: Newton-Schulz orthogonalises (its Gram-matrix form for
wide batches computes the same), Muon's update has the documented scale, and 2 ranks under real
torchrun (gloo, CPU) reach the same weights as one process accumulating gradients over the same
global batch."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.optim import Muon, zeropower_via_newtonschulz5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import dist_optim_worker as worker  # noqa: E402


def test_newton_schulz_maps_singular_values_near_one_for_tall_wide_and_batched():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 32), (64, 16), (16, 64), (3, 24, 40), (3, 16, 64), (2, 96, 24)]:
        G = torch.randn(shape, generator=g)
        X = zeropower_via_newtonschulz5(G)
        assert X.shape == G.shape
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        # same left/right singular directions: X is the polar factor of G, approximately
        u, _, vh = torch.linalg.svd(G, full_matrices=False)
        polar = u @ vh
        cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.98).all()


def test_wide_batches_iterated_on_the_gram_matrix_equal_the_plain_iteration_matrix_by_matrix():
    g = torch.Generator().manual_seed(1)
    low_rank = torch.randn(3, 32, 4, generator=g) @ torch.randn(3, 4, 128, generator=g)
    for G in [torch.randn(3, 32, 128, generator=g), low_rank + 1e-4 * torch.randn(3, 32, 128, generator=g),
              torch.randn(2, 160, 40, generator=g)]:  # 4:1 wide, nearly rank 4, 4:1 tall
        batched = zeropower_via_newtonschulz5(G)  # 3-D, k >= 2m: the iteration on the m x m Gram matrix
        for i in range(G.size(0)):
            plain = zeropower_via_newtonschulz5(G[i])  # 2-D: the plain iteration
            assert (batched[i] - plain).abs().max() < 1e-4 * plain.abs().max()


def test_muon_first_step_moves_each_matrix_along_its_gradients_polar_factor_scaled_by_its_aspect():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(64, 16))
    wide = torch.nn.Parameter(torch.randn(16, 64))
    before = [tall.detach().clone(), wide.detach().clone()]
    grads = [torch.randn(64, 16), torch.randn(16, 64)]
    tall.grad, wide.grad = grads[0].clone(), grads[1].clone()
    opt = Muon([tall, wide], lr=0.1, momentum=0.9)
    opt.step()
    for p, p0, g, aspect_scale in zip((tall, wide), before, grads, (2.0, 1.0)):  # sqrt(max(1, rows / cols))
        step = (p0 - p.detach()) / 0.1
        u, _, vh = torch.linalg.svd(g, full_matrices=False)  # the exact polar factor, by SVD
        polar = u @ vh
        assert (step * polar).sum() / (step.norm() * polar.norm()) > 0.98  # a descent step along it
        s = torch.linalg.svdvals(step / aspect_scale)
        assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())  # orthogonalised: no direction dominates
        assert torch.equal(p.grad, g)  # the optimizer does not clobber gradients


def test_muon_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_two_rank_torchrun_matches_single_process_gradient_accumulation(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "dist_optim_worker.py"), "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for arch in worker.ARCHS:
        assert ranks[0][arch]["optimizers"] == ["DistAdamW", "DistMuon"]
        reference, ref_state_sizes, ref_names = worker.train(arch, world_size=1, micro_batches=2)
        assert ref_names == ["AdamW", "Muon"]
        initial = worker.build_model(arch).state_dict()
        for name, ref in reference.items():
            # every rank holds identical weights after the all-gather
            assert torch.equal(ranks[0][arch]["weights"][name], ranks[1][arch]["weights"][name]), name
            assert not torch.equal(ref, initial[name]), f"{name} was never updated"
            err = _relative_error(ranks[0][arch]["weights"][name], ref)
            assert err <= 1e-5, f"{arch} {name}: relative error {err:.2e}"
        # optimizer state is sharded: each rank keeps well under the full state, together all of it
        for i in range(2):
            per_rank = [r[arch]["state_sizes"][i] for r in ranks]
            assert max(per_rank) < ref_state_sizes[i]
            assert sum(per_rank) >= ref_state_sizes[i]
    # odd shapes (replicated AdamW path, padded Muon slot), with reduce-scatter and with its all_reduce fallback
    reference = worker.train_toy(micro_batches=2)
    for key in ("toy", "toy_all_reduce"):
        for i, ref in enumerate(reference):
            assert torch.equal(ranks[0][key][i], ranks[1][key][i])
            err = _relative_error(ranks[0][key][i], ref)
            assert err <= 1e-5, f"{key} param {i}: relative error {err:.2e}"
    # the fallback is announced once (by rank 0), not silently and not every step
    assert (proc.stdout + proc.stderr).count("fall back to all_reduce + slice") == 1, proc.stderr[-2000:]

