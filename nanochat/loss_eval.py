"""
Bits per byte: the tokenizer-independent way to compare language-model losses.

Mean cross-entropy per token depends on how much text a token covers, so models with different
tokenizers cannot be compared by loss. Bits per byte sums the loss (in nats) over the tokens that
stand for text and divides by the number of UTF-8 bytes those tokens spell (times ln 2):

    bpb = sum(nats of targets with byte length > 0) / (ln 2 * sum(byte lengths of those targets))

Special tokens (byte length 0) and ignored targets (-1) count neither nats nor bytes.
"""

import math

import torch
import torch.distributed as dist


def _bits_per_byte(total_nats, total_bytes):
    """Sum over ranks, then nats -> bits per byte (inf when no byte was scored)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return (total_nats / (math.log(2) * total_bytes.double())).item()


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte over `steps` batches of (inputs, targets) from the iterator `batches`.
    token_bytes: LongTensor (vocab_size,) on the model's device. Summed over all ranks under DDP."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").reshape(-1)  # (B*T,) nats per target
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))  # (B*T,)
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    return _bits_per_byte(total_nats, total_bytes)


@torch.no_grad()
def unigram_bpb(train_batches, val_batches, steps, token_bytes):
    """Bits per byte of the best model that ignores context: token frequencies counted over `steps`
    train batches (add-one smoothed), scored on `steps` val batches like evaluate_bpb. It is the
    baseline a trained model has to beat clearly to show it learned more than token frequencies."""
    V = token_bytes.numel()
    counts = torch.ones(V, dtype=torch.float64, device=token_bytes.device)
    for _ in range(steps):
        _, y = next(train_batches)
        y = y.reshape(-1)
        counts += torch.bincount(y[y >= 0], minlength=V)[:V].double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    nats_of = counts.sum().log() - counts.log()  # (V,) -log p(token)
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        _, y = next(val_batches)
        y = y.reshape(-1)
        y = y[y >= 0]
        nbytes = token_bytes[y]
        total_nats += (nats_of[y] * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    return _bits_per_byte(total_nats, total_bytes)
