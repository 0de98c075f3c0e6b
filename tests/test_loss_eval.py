"""The unigram baseline that base_eval prints next to the model's bits per byte."""

import math

import torch

from nanochat.loss_eval import unigram_bpb


def batches(rows):
    while True:
        for y in rows:
            yield None, y


def test_unigram_bpb_is_the_smoothed_frequency_cross_entropy_per_byte():
    # train: token 1 three times as often as token 2; token 0 is a special (0 bytes), token 2 spells 2 bytes
    train = [torch.tensor([[1, 1, 1, 2, 0, -1]])]
    val = [torch.tensor([[1, 2, 0]])]
    token_bytes = torch.tensor([0, 1, 2, 1])  # vocab 4
    counts = torch.tensor([1 + 1, 1 + 3, 1 + 1, 1 + 0], dtype=torch.float64)  # add-one smoothing
    p = counts / counts.sum()
    expected = (-math.log(p[1]) - math.log(p[2])) / (math.log(2) * (1 + 2))  # the special counts neither nats nor bytes
    assert abs(unigram_bpb(batches(train), batches(val), 1, token_bytes) - expected) < 1e-12


def test_a_skewed_distribution_has_a_lower_unigram_bpb_than_a_uniform_one():
    token_bytes = torch.ones(16, dtype=torch.long)
    skewed = [torch.tensor([[3] * 60 + list(range(16))])]
    uniform = [torch.arange(16).repeat(5).view(1, -1)]
    assert unigram_bpb(batches(skewed), batches(skewed), 1, token_bytes) < unigram_bpb(batches(uniform), batches(uniform), 1, token_bytes)
    assert abs(unigram_bpb(batches(uniform), batches(uniform), 1, token_bytes) - 4.0) < 1e-9  # log2(16) bits per 1-byte token
