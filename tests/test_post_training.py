"""Post-training stages (mid_train, chat_sft, chat_rl, chat_eval): the loss mask fed to SFT, the RL
advantage and policy-gradient loss, exact loader resume, and every stage run for real (as a
subprocess, offline tasks) on a tiny model from a tiny base checkpoint the test builds."""

import os
import subprocess
import sys

import pytest
import torch

import string

from nanochat.chat_evaluation import answers_beyond_budget, reference_answer_tokens, run_categorical_eval
from nanochat.conversation_loader import ConversationBatches, PackedConversations, collate_supervised
from nanochat.policy_gradient import group_advantages, policy_gradient_loss
from nanochat.post_training import lr_multiplier
from nanochat.tokenizer import CharTokenizer

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
    # the char tokenizer (pure Python) keeps these tests independent of the compiled BPE trainer;
    # every stage only uses the shared tokenizer interface
    return CharTokenizer.train_from_iterator([string.printable])


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
    inputs, targets = collate_supervised(rows, pad_id)
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
    inputs, targets = collate_supervised(list(zip(seqs, masks)), pad_id=0)
    assert targets.tolist() == [[-1, 7, -1, 9], [-1, 7, -1, -1]]
    logprobs = torch.tensor([[-9.0, -1.0, -9.0, -2.0], [-9.0, -3.0, -9.0, -9.0]])
    adv = torch.tensor([0.5, -0.5])
    loss = policy_gradient_loss(logprobs, targets, adv, num_valid=3)
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + 0.5 * -2.0 + -0.5 * -3.0) / 3)


def test_mid_packing_rows_start_conversations_with_bos_and_resume_exactly(tokenizer):
    hello = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    convs = [TOOL_CONVERSATION, hello] * 5
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


class LetterTask(list):
    """Multiple-choice conversations whose right answer is the letter stored with each."""
    eval_type = "categorical"

    def evaluate(self, conversation, predicted):
        return predicted == conversation["answer"]


def test_a_generative_eval_knows_which_reference_answers_its_token_budget_cuts_off(tokenizer):
    # the char tokenizer: one token per character, so lengths can be counted by hand
    answers = ["12", "#### 1234", [{"type": "text", "text": "3*4="}, {"type": "python", "text": "3*4"},
                                   {"type": "python_output", "text": "12"}, {"type": "text", "text": "\n#### 12"}]]
    task = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in answers]
    # the tool call: 4 + python_start, 3, python_end + output_start, 2, output_end (forced, but generated
    # within the budget all the same) + 8 = 21
    assert [reference_answer_tokens(tokenizer, c) for c in task] == [2, 9, 21]
    assert answers_beyond_budget(task, tokenizer, max_new_tokens=8) == (2, 3, 21)
    assert answers_beyond_budget(task, tokenizer, max_new_tokens=9) == (1, 3, 21)
    assert answers_beyond_budget(task, tokenizer, max_new_tokens=21) == (0, 3, 21)
    assert answers_beyond_budget(task, tokenizer, max_new_tokens=8, max_problems=1) == (0, 1, 2)


def test_categorical_eval_counts_the_letter_with_the_highest_logit_and_reports_progress(tokenizer, capsys):
    task = LetterTask({"messages": [{"role": "user", "content": f"question {i}? A or B"},
                                    {"role": "assistant", "content": answer}], "letters": ["A", "B"], "answer": answer}
                      for i, answer in enumerate("BABBA"))
    favoured = tokenizer.encode("B")[0]

    def model_preferring_b(batch):
        logits = torch.zeros(*batch.shape, tokenizer.get_vocab_size())
        logits[..., favoured] = 1.0
        return logits

    assert run_categorical_eval(task, tokenizer, model_preferring_b, batch_size=2) == (3, 5)
    assert "3/5 passed" in capsys.readouterr().err  # the progress line (not a terminal: plain lines)


# -----------------------------------------------------------------------------
# Every stage for real, as the user runs it, on a tiny model and the offline tasks

def make_tiny_base_checkpoint(base_dir):
    """A tokenizer trained through the real trainer and a tiny random GPT saved as a base checkpoint."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    tok = CharTokenizer.train_from_iterator([string.printable])
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tok.fingerprint,
            "vocab_size": tok.get_vocab_size(), "train_args": {}, "metrics": {}, "dataloader_state": None}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d1"), 0, model.state_dict(), None, meta, tok)
    return tok


def run_stage(base_dir, module, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run mid -> sft -> rl on the offline tasks once; the tests below inspect the results."""
    base_dir = tmp_path_factory.mktemp("nanochat_base")
    make_tiny_base_checkpoint(str(base_dir))
    common = ["--offline", "--device", "cpu"]
    out = {}
    out["mid"] = run_stage(base_dir, "scripts.mid_train", *common, "--num-iterations", "3", "--device-batch-size", "2",
                           "--max-seq-len", "64", "--eval-every", "0", "--eval-steps", "1", "--save-every", "2")
    out["mid_resume"] = run_stage(base_dir, "scripts.mid_train", *common, "--num-iterations", "4",
                                  "--device-batch-size", "2", "--max-seq-len", "64", "--eval-every", "0",
                                  "--eval-steps", "1", "--resume")
    out["sft"] = run_stage(base_dir, "scripts.chat_sft", *common, "--num-iterations", "2", "--device-batch-size", "2",
                           "--target-examples-per-step", "4", "--eval-every", "0", "--eval-steps", "1",
                           "--eval-metrics-every", "0", "--eval-max-problems", "2", "--eval-max-new-tokens", "8")
    out["rl"] = run_stage(base_dir, "scripts.chat_rl", *common, "--num-iterations", "1", "--examples-per-step", "2",
                          "--num-samples", "2", "--device-batch-size", "2", "--max-new-tokens", "8",
                          "--eval-every", "0", "--eval-examples", "2", "--pass-k", "2")
    return base_dir, out


def test_each_stage_writes_a_loadable_checkpoint(pipeline):
    base_dir, out = pipeline
    from nanochat.checkpoint_manager import load_model
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
    try:
        for source, step in (("mid", 4), ("sft", 2), ("rl", 1)):
            model, tok, meta = load_model(source, "cpu", model_tag="d1")
            assert meta["step"] == step
            logits = model(torch.tensor([[tok.get_bos_token_id()]]))
            assert logits.shape[-1] == tok.get_vocab_size()
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    assert "resuming midtraining" in out["mid_resume"] and "step 00004/4" in out["mid_resume"]
    assert "step 00003/4" not in out["mid_resume"]  # resumed from step 3, did not start over


def test_chat_eval_prints_accuracy_per_task_and_chatcore(pipeline):
    base_dir, _ = pipeline
    text = run_stage(base_dir, "scripts.chat_eval", "-i", "sft", "--offline", "--device", "cpu",
                     "-a", "Arithmetic|SimpleSpelling|HumanEval", "-x", "3", "-m", "8")
    assert "Arithmetic accuracy:" in text and "SimpleSpelling accuracy:" in text and "HumanEval accuracy:" in text
    assert "sandbox: confined by the kernel" in text  # said once, before model-written code runs
    # -m 8 cannot hold a worked arithmetic answer: the eval says so rather than quietly scoring it 0
    assert "Arithmetic reference answers are longer than --max-new-tokens 8" in text
    assert "ChatCORE:" in text
    # the report card got one section per stage, and the eval section holds each task's accuracy
    import json
    report_dir = os.path.join(str(base_dir), "report")
    for slug in ("midtraining", "chat-sft", "chat-rl", "chat-evaluation-sft"):
        assert os.path.exists(os.path.join(report_dir, slug + ".md")), slug
    with open(os.path.join(report_dir, "chat-evaluation-sft.json")) as f:
        logged = json.load(f)["metrics"]
    assert 0.0 <= logged["Arithmetic"] <= 1.0 and 0.0 <= logged["SimpleSpelling"] <= 1.0
    assert "ChatCORE" in logged


def test_chat_eval_with_bf16_weights_says_so_and_records_it_in_the_report(pipeline):
    base_dir, _ = pipeline
    text = run_stage(base_dir, "scripts.chat_eval", "-i", "sft", "--offline", "--device", "cpu",
                     "-a", "Arithmetic", "-x", "2", "-m", "8", "--weights-dtype", "bfloat16")
    assert "decoding with bfloat16 weights" in text and "Arithmetic accuracy:" in text
    import json
    with open(os.path.join(str(base_dir), "report", "chat-evaluation-sft.json")) as f:
        assert json.load(f)["metrics"]["weights_dtype"] == "bfloat16"


def test_sft_with_freeze_keeps_low_embedding_rows_bit_identical_and_rejects_index_above_vocab(pipeline):
    base_dir, _ = pipeline
    from nanochat.checkpoint_manager import load_model
    freeze = 60
    run_stage(base_dir, "scripts.chat_sft", "--offline", "--device", "cpu", "--num-iterations", "2",
              "--device-batch-size", "2", "--target-examples-per-step", "2", "--eval-every", "0", "--eval-steps", "1",
              "--eval-metrics-every", "0", "--eval-max-problems", "1", "--eval-max-new-tokens", "4",
              "--init-lr-frac", "1.0", "--weight-decay", "0.1", "--freeze-until-index", str(freeze),
              "--output-tag", "frozen")
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
    try:
        before, tok, _ = load_model("mid", "cpu", model_tag="d1")
        after, _, meta = load_model("sft", "cpu", model_tag="frozen")
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    assert meta["freeze_until_index"] == freeze
    V = tok.get_vocab_size()
    for get in (lambda m: m.transformer.wte.weight, lambda m: m.lm_head.weight):
        assert torch.equal(get(after)[:freeze], get(before)[:freeze])
        assert not torch.equal(get(after)[freeze:V], get(before)[freeze:V])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--offline", "--device", "cpu",
                           "--freeze-until-index", str(V + 1)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "above the vocab size" in proc.stderr and "Traceback" not in proc.stderr
