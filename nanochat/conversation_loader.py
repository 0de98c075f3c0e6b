"""
Conversation loaders for post-training: task conversations -> (inputs, targets) on the device.

- PackedConversations (midtraining): conversations rendered and concatenated into one token stream,
  each starting with BOS, cut into rows of T+1 tokens, exactly like pretraining data.
- ConversationBatches (SFT): each conversation on its own row, padded to the longest of its batch, with
  the loss mask applied: only the assistant's own tokens are targets (collate_supervised).
- collate_supervised is also how RL batches its sampled sequences (the engine's mask marks sampled tokens).

Rank r of w takes conversations r, r+w, r+2w, ...; at the end of the data a loader wraps around (epoch += 1).
`state()` / the constructor's `state` resume exactly.
"""

import torch

from nanochat.common import NanochatError


def collate_supervised(rows, pad_id):
    """rows: list of (ids, mask), as render_conversation or the engine returns them. Returns (inputs, targets),
    both (B, T) int64 with T = longest row - 1. targets[b, t] = ids[t+1] where mask[t+1] == 1, else -1
    (unsupervised positions and padding never contribute to the loss)."""
    T = max(len(ids) for ids, _ in rows) - 1
    if T < 1:
        raise NanochatError("a rendered conversation has fewer than 2 tokens; check the task data")
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        mask_t = torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        inputs[b, :n] = ids_t[:-1]
        row_targets = ids_t[1:].clone()
        row_targets[~mask_t[1:]] = -1
        targets[b, :n] = row_targets
    return inputs, targets


class _RankCursor:
    """This rank's position in the dataset (indices rank, rank+world, ...), wrapping around (epoch += 1)."""

    def __init__(self, dataset, rank, world_size, state):
        if len(dataset) < world_size:
            raise NanochatError(f"the dataset has {len(dataset)} conversations, fewer than {world_size} ranks")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.cursor = state["cursor"] if state else rank
        self.epoch = state["epoch"] if state else 0

    def next_conversation(self):
        if self.cursor >= len(self.dataset):
            self.cursor = self.rank
            self.epoch += 1
        conversation = self.dataset[self.cursor]
        self.cursor += self.world_size
        return conversation

    def progress(self):
        """Epochs consumed so far, fractional."""
        return self.epoch + self.cursor / len(self.dataset)


class PackedConversations(_RankCursor):
    """Conversations packed into a token stream, served as (B, T) inputs/targets from rows of T+1 tokens.
    The state (cursor, epoch, the leftover tokens) resumes exactly."""

    def __init__(self, dataset, tokenizer, B, T, rank=0, world_size=1, state=None):
        super().__init__(dataset, rank, world_size, state)
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.buffer = list(state["buffer"]) if state else []

    def state(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": list(self.buffer)}

    def next_batch(self, device):
        need = self.B * (self.T + 1)
        while len(self.buffer) < need:
            # cap each conversation at one row so a single long one cannot dominate a batch
            ids, _ = self.tokenizer.render_conversation(self.next_conversation(), max_tokens=self.T + 1)
            self.buffer.extend(ids)
        rows = torch.tensor(self.buffer[:need], dtype=torch.long).view(self.B, self.T + 1)
        del self.buffer[:need]
        rows = rows.to(device)
        return rows[:, :-1], rows[:, 1:]


class ConversationBatches(_RankCursor):
    """`batch_size` conversations at a time, each truncated to max_seq_len + 1 tokens, padded with
    <|assistant_end|> and supervised only on the assistant's tokens (collate_supervised)."""

    def __init__(self, dataset, tokenizer, batch_size, max_seq_len, rank=0, world_size=1, state=None):
        super().__init__(dataset, rank, world_size, state)
        self.tokenizer, self.batch_size, self.max_seq_len = tokenizer, batch_size, max_seq_len
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")

    def state(self):
        return {"cursor": self.cursor, "epoch": self.epoch}

    def next_batch(self, device):
        rows = [self.tokenizer.render_conversation(self.next_conversation(), max_tokens=self.max_seq_len + 1)
                for _ in range(self.batch_size)]
        inputs, targets = collate_supervised(rows, self.pad_id)
        return inputs.to(device), targets.to(device)
