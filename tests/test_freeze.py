"""--freeze-until-index: rows < N of the embedding, the output head and any value embeddings stay bit-identical through
training with the real optimizers (AdamW with weight decay + Muon), rows >= N still learn,
and a freeze index above the vocab size is an error, never a silent clamp."""

import pytest
import torch

from nanochat.common import NanochatError
from nanochat.freeze import FrozenRows, resolve_freeze_index
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import CharTokenizer

VOCAB = 100
FREEZE = 60


def tiny_model(seed=0, **extras):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, **extras))
    model.init_weights()
    return model


def train_steps(model, optimizers, steps, frozen=None, seed=1):
    """A few real steps on random tokens covering the whole vocab (every row gets gradient)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 16), generator=gen)
        y = torch.randint(0, VOCAB, (4, 16), generator=gen)
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if frozen is not None:
            frozen.restore()


def vocab_weights(model):
    return model.transformer.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()


def test_frozen_rows_stay_bit_identical_and_other_rows_change_with_adamw_weight_decay_and_muon():
    model = tiny_model()
    optimizers = model.setup_optimizers(weight_decay=0.1, embedding_lr=0.2, unembedding_lr=0.05)
    # warm the optimizer moments first, as after resuming from an earlier stage: momentum and weight
    # decay would move the rows even with their gradient zeroed, so the freeze must undo updates too
    train_steps(model, optimizers, 2, seed=7)
    wte0, head0 = vocab_weights(model)
    frozen = FrozenRows(model, FREEZE, VOCAB)
    train_steps(model, optimizers, 4, frozen=frozen)
    wte1, head1 = vocab_weights(model)
    assert torch.equal(wte1[:FREEZE], wte0[:FREEZE])
    assert torch.equal(head1[:FREEZE], head0[:FREEZE])
    assert frozen.unchanged()
    # rows >= N are trained: every one of the (non-padding) rows moved
    assert (wte1[FREEZE:VOCAB] != wte0[FREEZE:VOCAB]).any(dim=1).all()
    assert (head1[FREEZE:VOCAB] != head0[FREEZE:VOCAB]).any(dim=1).all()
    frozen.remove()


def test_value_embedding_tables_are_frozen_row_by_row_as_the_embedding_is():
    model = tiny_model(value_embeds=True)
    optimizers = model.setup_optimizers(weight_decay=0.1)
    table = model.value_embeds["1"].weight
    before = table.detach().clone()
    frozen = FrozenRows(model, FREEZE, VOCAB)
    train_steps(model, optimizers, 3, frozen=frozen)
    assert torch.equal(table[:FREEZE], before[:FREEZE])
    assert (table[FREEZE:VOCAB] != before[FREEZE:VOCAB]).any(dim=1).all()
    frozen.remove()


def test_without_freeze_the_same_training_changes_the_low_rows():
    # the control for the test above: the training really does move rows < N when nothing is frozen
    model = tiny_model()
    optimizers = model.setup_optimizers(weight_decay=0.1, embedding_lr=0.2, unembedding_lr=0.05)
    train_steps(model, optimizers, 2, seed=7)
    wte0, head0 = vocab_weights(model)
    train_steps(model, optimizers, 4)
    wte1, head1 = vocab_weights(model)
    assert not torch.equal(wte1[:FREEZE], wte0[:FREEZE])
    assert not torch.equal(head1[:FREEZE], head0[:FREEZE])


def test_frozen_rows_receive_zero_gradient():
    model = tiny_model()
    frozen = FrozenRows(model, FREEZE, VOCAB)
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, x).backward()
    assert torch.count_nonzero(model.transformer.wte.weight.grad[:FREEZE]) == 0
    assert torch.count_nonzero(model.lm_head.weight.grad[:FREEZE]) == 0
    assert torch.count_nonzero(model.lm_head.weight.grad[FREEZE:VOCAB]) > 0


def test_freeze_index_above_vocab_size_is_an_error_not_a_clamp():
    model = tiny_model()
    with pytest.raises(NanochatError, match="above the vocab size"):
        FrozenRows(model, VOCAB + 1, VOCAB)
    tokenizer = CharTokenizer.train_from_iterator(["abcdef"])
    vocab = tokenizer.get_vocab_size()
    with pytest.raises(NanochatError, match="above the vocab size"):
        resolve_freeze_index(vocab + 1, tokenizer)
    with pytest.raises(NanochatError):
        resolve_freeze_index(-1, tokenizer)
    assert resolve_freeze_index(vocab, tokenizer) == vocab


def test_default_freeze_index_is_the_original_vocab_size_of_an_extended_tokenizer():
    base = CharTokenizer.train_from_iterator(["abcdef"])
    assert resolve_freeze_index(None, base) == 0  # never extended: nothing frozen by default
    # an extension appends two new characters after every existing id (nothing renumbered)
    V0 = base.get_vocab_size()
    id_to_char = dict(base.id_to_char)
    id_to_char.update({V0: "g", V0 + 1: "h"})
    extended = CharTokenizer(id_to_char, base.special_tokens, parent_fingerprint=base.fingerprint,
                             original_vocab_size=V0)
    assert extended.get_vocab_size() == V0 + 2
    assert resolve_freeze_index(None, extended) == V0
    assert resolve_freeze_index(0, extended) == 0  # 0 turns the default off
