"""
Inference: a preallocated KV cache, sampling, the tool-use state machine and streaming decode.

- `KVCache` implements gpt.py's cache protocol (`insert_kv`, `get_pos`) over tensors of shape
  (n_layers, B, H_kv, T_max, D) allocated once per generation.
- `Engine(model, tokenizer).generate(...)` prefills the prompt once at batch 1, copies that cache
  into `num_samples` rows and decodes all rows in parallel, yielding one column of ids per step.
- Tool use: a row that writes `<|python_start|>expr<|python_end|>` gets the calculator's result
  forced into its stream as `<|output_start|>result<|output_end|>` (mask 0 for forced tokens).
- `StreamDecoder` turns ids into text pieces without ever emitting half a UTF-8 character.

The context window: a prompt must be shorter than the model's `sequence_len` (NanochatError
otherwise, so callers trim old turns); generation stops when prompt + answer fill the window.
We never slide the window, because a cache built for one window cannot be reused for the next.
"""

import collections

import torch
import torch.nn.functional as F

from nanochat import fast_decode
from nanochat.common import NanochatError
from nanochat.calculator import eval_calculator
from nanochat.gpt import GPT


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every layer for B rows and up to max_len positions.
    Memory is allocated at the first insert, with the dtype/device the model computes in."""

    def __init__(self, batch_size, num_heads, head_dim, num_layers, max_len):
        self.shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = None  # (L, B, H_kv, T_max, D)
        self.v = None
        self.pos = 0   # number of positions already written (the rotary offset of the next token)
        self.prev_embed = None  # (B, 1, C): the last position's embedding, for a model with smear
        self.step_buffers = None  # fast_decode.StepBuffers: a one-token step's outputs, made for k/v

    @property
    def batch_size(self):
        return self.shape[1]

    @property
    def max_len(self):
        return self.shape[3]

    def reset(self):
        self.pos = 0
        self.prev_embed = None

    def get_pos(self):
        return self.pos

    def _allocate(self, like):
        self.k = torch.empty(self.shape, dtype=like.dtype, device=like.device)
        self.v = torch.empty(self.shape, dtype=like.dtype, device=like.device)

    def insert_kv(self, layer_idx, k, v):
        """k, v: (B, H_kv, T, D) for the T new positions -> all keys/values so far, (B, H_kv, pos+T, D)."""
        if self.k is None:
            self._allocate(k)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_len:
            raise NanochatError(f"KV cache overflow: {t1} positions into a cache of {self.max_len}")
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        if layer_idx == self.shape[0] - 1:
            self.pos = t1  # the last layer has written: the next forward starts after these tokens
        return self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]

    def prefill(self, other):
        """Start from `other`'s contents (batch 1, or the same batch size): its rows are copied
        (broadcast) into every row of this cache. Used to decode many samples from one prefill."""
        if other.k is None:
            raise ValueError("cannot prefill from an empty KV cache")
        L, B, H, T, D = self.shape
        if other.shape[0] != L or other.shape[2] != H or other.shape[4] != D:
            raise ValueError(f"KV cache shapes differ: {other.shape} vs {self.shape}")
        if other.batch_size not in (1, B):
            raise ValueError(f"cannot expand a batch of {other.batch_size} into {B} rows")
        if other.pos > T:
            raise ValueError(f"the source cache holds {other.pos} positions, more than {T}")
        if self.k is None:
            self._allocate(other.k)
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n]  # broadcasts over the batch dim when other has 1 row
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n
        self.prev_embed = None if other.prev_embed is None else other.prev_embed.expand(B, -1, -1).clone()

    def keep_rows(self, rows):
        """Drop finished rows: keep only batch rows `rows` (LongTensor of indices), in that order."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.prev_embed is not None:
            self.prev_embed = self.prev_embed.index_select(0, rows)
        self.shape = (self.shape[0], len(rows)) + self.shape[2:]


# -----------------------------------------------------------------------------
# Sampling

def sample_next(logits, generator, temperature=1.0, top_k=None, top_p=None, bound=None):
    """logits (B, V) float -> (B,) ids. temperature 0 = greedy; top_k keeps the k most likely;
    top_p keeps the smallest set of most likely ids whose probability reaches p (nucleus).
    bound: a known bound on |logits| (a soft-capped model's softcap), which lets sampling skip
    subtracting the row maximum."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    use_top_p = top_p is not None and top_p < 1.0
    idx = None
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    elif use_top_p:
        logits, idx = torch.sort(logits, dim=-1, descending=True)
    if use_top_p:
        probs = F.softmax(logits / temperature, dim=-1)
        # drop an id when the ids strictly before it already reach top_p (the first id always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = sample_from_logits(logits, generator, temperature, bound)
    return choice if idx is None else idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


# exp(x) of fp32 logits up to this, summed over any vocab, stays far below fp32's max (3.4e38)
EXP_SAFE_MAX = 60.0


def sample_from_logits(logits, generator, temperature=1.0, bound=None):
    """One id per row with probability softmax(logits / temperature), by inverting the CDF of the
    unnormalised weights with one uniform draw per row. On CPU this is ~10x cheaper than
    torch.multinomial (no exponential noise over the whole vocab, no validity scans, no
    normalisation), which matters when a whole decode step of a small model takes ~1 ms.
    With |logits| <= bound and bound / temperature <= EXP_SAFE_MAX the row maximum need not be
    subtracted first (exp cannot overflow): two passes over the vocab fewer."""
    if bound is not None and bound / temperature <= EXP_SAFE_MAX:
        weights = logits.exp() if temperature == 1.0 else torch.exp(logits * (1.0 / temperature))  # (B, V)
    else:
        weights = (logits - logits.amax(dim=-1, keepdim=True)).mul_(1.0 / temperature).exp_()  # (B, V), max 1
    cdf = weights.cumsum_(dim=-1)  # cdf[:, -1] is the total mass
    u = torch.rand((cdf.size(0), 1), generator=generator, dtype=cdf.dtype, device=cdf.device)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first id whose CDF exceeds u * total
    return choice.squeeze(-1).clamp_(max=cdf.size(-1) - 1)


# -----------------------------------------------------------------------------
# Streaming decode

# How a tool call reads in a chat transcript: «12*7 → 84»
TOOL_MARKUP = {"<|python_start|>": "«", "<|python_end|>": "", "<|output_start|>": " → ", "<|output_end|>": "»"}


class StreamDecoder:
    """Incremental detokenizer: push ids, get text pieces that never end inside a UTF-8 character.

    Byte-level BPE can split one character (é, an emoji) over several tokens. We keep the ids
    whose text is not yet complete, decode them together on every push, and emit only the part
    before a trailing U+FFFD (the decoder's mark for an incomplete byte sequence). Once the tail
    decodes cleanly the pending ids are dropped. `flush()` emits whatever is left at the end."""

    MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes; beyond this the bytes are truly invalid

    def __init__(self, tokenizer, show_tool_calls=True):
        self.tokenizer = tokenizer
        self.pending = []   # ids not yet fully emitted
        self.emitted = 0    # characters of decode(pending) already emitted
        # special ids are shown as markup (tool calls) or not at all, never as "<|...|>"
        shown = TOOL_MARKUP if show_tool_calls else {}
        self.specials = {tokenizer.encode_special(name): shown.get(name, "") for name in tokenizer.get_special_tokens()}

    def push(self, token_id):
        if token_id in self.specials:
            return self.flush() + self.specials[token_id]
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        complete = text.rstrip("\ufffd")
        if len(complete) == len(text) or len(self.pending) >= self.MAX_PENDING:
            complete = text
        piece = complete[self.emitted:]
        if complete is text:
            self.pending, self.emitted = [], 0
        else:
            self.emitted = max(self.emitted, len(complete))
        return piece

    def flush(self):
        piece = self.tokenizer.decode(self.pending)[self.emitted:] if self.pending else ""
        self.pending, self.emitted = [], 0
        return piece


# -----------------------------------------------------------------------------
# Tool use

def run_calculator(code):
    """The model's python block -> result text, or None when the calculator refuses it."""
    try:
        return eval_calculator(code)
    except Exception:  # a refusal must never take generation down
        return None


class RowState:
    """Per-sample tool-use bookkeeping."""
    __slots__ = ("in_python", "python_ids", "forced")

    def __init__(self):
        self.in_python = False
        self.python_ids = []
        self.forced = collections.deque()  # ids to feed instead of sampling (tool output)


# -----------------------------------------------------------------------------
# The engine

# --weights-dtype of the chat scripts: "model" decodes with the model's own weights
WEIGHTS_DTYPES = {"model": None, "bfloat16": torch.bfloat16}
WEIGHTS_DTYPE_HELP = ("weights the Engine decodes with: the model's own, or a bfloat16 copy (half the bytes per "
                      "token; quality cost in dev/BENCHMARKS.md)")

class Engine:
    def __init__(self, model, tokenizer, tools=True, weights_dtype=None):
        """tools=False: python blocks are plain tokens, never run (raw continuation of a text
        must match the model's own greedy output, with nothing forced into it).
        weights_dtype (e.g. torch.bfloat16): decode with a copy of the weights in that dtype
        (see fast_decode); None decodes with the model's own precision."""
        self.model = model
        self.tokenizer = tokenizer
        enc = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = enc("<|assistant_end|>")
        self.python_start = enc("<|python_start|>") if tools else None
        self.python_end = enc("<|python_end|>") if tools else None
        self.output_start = enc("<|output_start|>")
        self.output_end = enc("<|output_end|>")
        # ids that need the per-row state machine; any other step takes the fast path
        tool_ids = (self.python_start, self.python_end) if tools else ()
        self.watched = frozenset((self.bos, self.assistant_end) + tool_ids)
        if self.device.type == "cpu":
            # reuse freed heap memory instead of fresh mmap()s for every (B, vocab) temporary
            from nanochat.cpu_allocator import configure_cpu_allocator
            configure_cpu_allocator()
        # self.fast: the weights of the flat one-token step (fast_decode), used on CPU; None (other
        # devices, the qwen2 arch, or set by a caller) decodes through model.forward
        self.fast = None
        # our GPT computes the prefill's logits at the last position only (other models: all, then [-1])
        self.prefill_options = {"last_only": True} if isinstance(model, GPT) else {}
        # soft-capped logits are bounded, which sampling can use (sample_from_logits)
        softcap = model.config.softcap if isinstance(model, GPT) else 0
        self.logit_bound = softcap if softcap > 0 else None
        if fast_decode.supports(model) and (self.device.type == "cpu" or weights_dtype is not None):
            self.fast = fast_decode.DecodeWeights(model, weights_dtype)
        elif weights_dtype is not None:
            raise NanochatError(f"decoding with {weights_dtype} weights needs the nanochat arch, "
                                f"not {model.config.arch}")

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def _new_cache(self, batch_size, max_len):
        cfg = self.model.config
        return KVCache(batch_size, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, max_len)

    def _check_prompt(self, tokens):
        if not tokens:
            raise ValueError("generate() needs at least one prompt token")
        window = self.model.config.sequence_len
        if len(tokens) >= window:
            raise NanochatError(f"the prompt is {len(tokens)} tokens but the model's context window is {window}; "
                                f"shorten the conversation (start a new chat)")
        vocab = self.model.config.vocab_size
        if max(tokens) >= vocab or min(tokens) < 0:
            raise NanochatError(f"prompt has token id {max(tokens)} outside the model's vocab of {vocab}; "
                                f"was it encoded with another tokenizer?")

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Sample `num_samples` continuations of the prompt `tokens` (list of ids) in parallel.

        Yields (token_column, token_masks) per step: lists of length num_samples with each row's
        next id and 1 if it was sampled, 0 if it was forced (tool output). A row stops after it
        yields <|assistant_end|> or <|bos|>; later entries of a finished row repeat
        <|assistant_end|> with mask 0 and must be ignored. Stops when every row has finished, after
        max_tokens steps, or when the context window is full (see the module docstring)."""
        self._check_prompt(tokens)
        model, device = self.model, self.device
        budget = model.config.sequence_len - len(tokens)
        max_new = budget if max_tokens is None else min(int(max_tokens), budget)
        if max_new <= 0:
            return
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        # --- prefill the prompt once, at batch 1, then share it with every sample
        prompt_cache = self._new_cache(1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prompt_cache, **self.prefill_options)[:, -1, :]  # (1, V)
        cache = self._new_cache(num_samples, len(tokens) + max_new)
        cache.prefill(prompt_cache)
        del prompt_cache
        logits = logits.expand(num_samples, -1)

        # --- decode: `active` maps batch row -> sample index; finished rows leave the batch
        rows = [RowState() for _ in range(num_samples)]
        active = list(range(num_samples))
        busy = 0  # rows inside a python block or with forced ids pending: need the slow path
        prepared = self.fast.get() if self.fast is not None else None  # weights checked once per call
        watched, end = self.watched, self.assistant_end
        for step in range(max_new):
            next_ids = sample_next(logits, generator, temperature, top_k, top_p, self.logit_bound)  # (B_active,)
            column = next_ids.tolist()
            masks = [1] * len(column)
            finished = None
            if busy or not watched.isdisjoint(column):
                finished, busy, changed = self._step_tool_state(rows, active, column, masks)
                if changed:
                    next_ids = torch.tensor(column, dtype=torch.long, device=device)
            if len(active) == num_samples:
                yield column, masks
            else:  # scatter the active rows back into full-width lists
                full_column, full_masks = [end] * num_samples, [0] * num_samples
                for j, r in enumerate(active):
                    full_column[r], full_masks[r] = column[j], masks[j]
                yield full_column, full_masks
            if step == max_new - 1:
                break
            if finished:
                keep = [j for j in range(len(active)) if j not in finished]
                if not keep:
                    break
                active = [active[j] for j in keep]
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                cache.keep_rows(keep_t)
                next_ids = next_ids.index_select(0, keep_t)
            if self.fast is not None:
                logits = fast_decode.decode_step(model, prepared, next_ids, cache)
            else:
                logits = model(next_ids.view(-1, 1), kv_cache=cache)[:, -1, :]

    def _step_tool_state(self, rows, active, column, masks):
        """The slow path of one step: forced ids, python blocks, stop tokens. Edits column/masks in
        place; returns (batch positions that finished, rows still busy, whether column changed)."""
        finished, busy, changed = set(), 0, False
        for j, r in enumerate(active):
            state = rows[r]
            if state.forced:
                column[j] = state.forced.popleft()
                masks[j] = 0
                changed = True
            tok = column[j]
            if tok == self.assistant_end or tok == self.bos:
                finished.add(j)
                continue
            if tok == self.python_start:
                state.in_python, state.python_ids = True, []
            elif tok == self.python_end and state.in_python:
                state.in_python = False
                result = run_calculator(self.tokenizer.decode(state.python_ids))
                if result is not None:
                    state.forced.append(self.output_start)
                    state.forced.extend(self.tokenizer.encode(str(result)))
                    state.forced.append(self.output_end)
            elif state.in_python:
                state.python_ids.append(tok)
            busy += state.in_python or bool(state.forced)
        return finished, busy, changed

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming generate: (results, masks), one list per sample. Each result is the prompt
        followed by the generated ids, without the terminal <|assistant_end|>/<|bos|>; masks are 0
        for prompt and forced ids, 1 for sampled ids (as nanochat's Engine.generate_batch)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for r, (tok, mask) in enumerate(zip(column, column_masks)):
                if done[r]:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    done[r] = True
                else:
                    results[r].append(tok)
                    masks[r].append(mask)
            if all(done):
                break
        return results, masks
