"""Post-training stages (mid_train, chat_sft, chat_rl, chat_eval): the loss mask fed to SFT, the RL
advantage and policy-gradient loss, exact loader resume, and every stage run for real (as a
subprocess, offline tasks) on a tiny model from a tiny base checkpoint the test builds."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.tokenizer import RustBPETokenizer
from scripts.chat_rl import group_advantages, pad_samples, policy_gradient_loss
from scripts.chat_sft import ConversationBatches, sft_collate
from scripts.mid_train import PackedConversations, lr_multiplier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "Tom has 3 boxes of 12 apples. How many apples?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "He has 3 boxes of 12, so "},
        {"type": "python", "text": "3*12"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "36 apples.\n#### 36"},
    ]},
    {"role": "user", "content": "And 2 more boxes?"},
    {"role": "assistant", "content": "5 boxes hold 60 apples."},
]}


@pytest.fixture(scope="module")
def tokenizer():
    text = ["How many apples are in the boxes? He has 3 boxes of 12 apples, so 36 apples. " * 20,
            "Spell the word banana: b-a-n-a-n-a. The letter a appears 3 times. " * 20]
    return RustBPETokenizer.train_from_iterator(iter(text), vocab_size=256 + 9 + 40)


def expected_supervision(tokenizer, ids):
    """An independent spec of the SFT mask: a token is supervised iff it lies inside an assistant
    turn (after <|assistant_start|>, up to and including <|assistant_end|>) and outside a tool
    output (<|output_start|> ... <|output_end|> inclusive)."""
    special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    in_assistant = in_output = False
    supervised = []
    for tok in ids:
        if tok == special["<|assistant_start|>"]:
            in_assistant = True
            supervised.append(False)
        elif tok == special["<|assistant_end|>"]:
            supervised.append(in_assistant)
            in_assistant = False
        elif tok == special["<|output_start|>"]:
            in_output = True
            supervised.append(False)
        elif tok == special["<|output_end|>"]:
            in_output = False
            supervised.append(False)
        else:
            supervised.append(in_assistant and not in_output)
    return supervised


def test_sft_batches_supervise_exactly_the_assistant_tokens_and_not_user_or_tool_output(tokenizer):
    short = {"messages": [{"role": "user", "content": "Spell banana"},
                          {"role": "assistant", "content": "b-a-n-a-n-a"}]}
    rows = [tokenizer.render_conversation(TOOL_CONVERSATION), tokenizer.render_conversation(short)]
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    inputs, targets = sft_collate(rows, pad_id)
    assert inputs.shape == targets.shape == (2, len(rows[0][0]) - 1)
    for b, (ids, _) in enumerate(rows):
        spec = expected_supervision(tokenizer, ids)
        want = [ids[t + 1] if spec[t + 1] else -1 for t in range(len(ids) - 1)]
        assert targets[b, :len(ids) - 1].tolist() == want
        assert inputs[b, :len(ids) - 1].tolist() == ids[:-1]
        assert (targets[b, len(ids) - 1:] == -1).all()  # padding never contributes
    # concretely: no token of the user turns or of the tool output is a target, and the tool call is
    supervised_text = tokenizer.decode([t for t in targets[0].tolist() if t >= 0])
    assert "apples?" not in supervised_text and "more boxes" not in supervised_text
    assert "3*12" in supervised_text and "#### 36" in supervised_text
    output_ids = tokenizer.encode("36")
    ids0 = rows[0][0]
    out_start = ids0.index(tokenizer.encode_special("<|output_start|>"))
    assert ids0[out_start + 1:out_start + 1 + len(output_ids)] == output_ids
    assert all(targets[0, t - 1] == -1 for t in range(out_start, out_start + len(output_ids) + 2))


def test_rl_advantage_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards)
    assert torch.allclose(adv, rewards - 0.6)
    assert torch.allclose(group_advantages(torch.ones(4)), torch.zeros(4))  # no signal when all agree


def test_rl_policy_gradient_uses_only_sampled_tokens():
    # prompt [5, 6], then sampled 7, forced tool output 8 (mask 0), sampled 9
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1]]
    inputs, targets = pad_samples(seqs, masks, pad_id=0)
    assert targets.tolist() == [[-1, 7, -1, 9], [-1, 7, -1, -1]]
    logprobs = torch.tensor([[-9.0, -1.0, -9.0, -2.0], [-9.0, -3.0, -9.0, -9.0]])
    adv = torch.tensor([0.5, -0.5])
    loss = policy_gradient_loss(logprobs, targets, adv, num_valid=3)
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + 0.5 * -2.0 + -0.5 * -3.0) / 3)


def test_mid_packing_rows_start_conversations_with_bos_and_resume_exactly(tokenizer):
    convs = [TOOL_CONVERSATION, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 5
    loader = PackedConversations(convs, tokenizer, B=2, T=16)
    x0, y0 = loader.next_batch("cpu")
    assert x0[0, 0].item() == tokenizer.get_bos_token_id()
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the inputs shifted by one
    loader.next_batch("cpu")
    saved = loader.state()
    want = [loader.next_batch("cpu") for _ in range(3)]
    resumed = PackedConversations(convs, tokenizer, B=2, T=16, state=saved)
    got = [resumed.next_batch("cpu") for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))


def test_sft_loader_shards_by_rank_and_resumes_exactly(tokenizer):
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(7)]
    r0 = ConversationBatches(convs, tokenizer, 2, 32, rank=0, world_size=2)
    r1 = ConversationBatches(convs, tokenizer, 2, 32, rank=1, world_size=2)
    x0, _ = r0.next_batch("cpu")
    x1, _ = r1.next_batch("cpu")
    assert "q0" in tokenizer.decode(x0[0].tolist()) and "q2" in tokenizer.decode(x0[1].tolist())
    assert "q1" in tokenizer.decode(x1[0].tolist()) and "q3" in tokenizer.decode(x1[1].tolist())
    state = r0.state()
    want = [r0.next_batch("cpu")[1] for _ in range(3)]  # wraps past the end of the data
    resumed = ConversationBatches(convs, tokenizer, 2, 32, rank=0, world_size=2, state=state)
    assert all(torch.equal(a, resumed.next_batch("cpu")[1]) for a in want)


def test_mid_lr_schedule_is_constant_then_warms_down_to_zero():
    assert lr_multiplier(0.0, 0.2) == 1.0 and lr_multiplier(0.79, 0.2) == 1.0
    assert lr_multiplier(0.9, 0.2) == pytest.approx(0.5)
    assert lr_multiplier(1.0, 0.2) == 0.0
