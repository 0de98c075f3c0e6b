"""
The GPT model, in two flavours of Transformer block:

- "nanochat" (default): rotary positions, parameter-free RMSNorm (also after the token
  embedding and on queries/keys), ReLU² MLP, no biases, untied embeddings, zero-initialised
  output projections, logit soft-capping, grouped-query attention via n_kv_head.
- "qwen2": the Qwen2.5 block exactly as Hugging Face's Qwen2ForCausalLM computes it: learnable
  RMSNorm (eps 1e-6, in fp32), SwiGLU MLP, bias on q/k/v (not o), rope theta 1e6 with the
  rotate_half convention, optional tied embeddings, no QK-norm, no soft-capping.

The embedding and head have `padded_vocab_size` rows (a multiple of `pad_vocab_to`, faster
matmuls); logits are only ever returned for the tokenizer's `vocab_size` ids, so padded rows
can never be sampled or trained towards.

KV cache protocol (the cache itself lives in engine.py): `kv_cache.get_pos()` is read at the
start of forward (rotary offset of the first new token); inside attention layer i, after
rotary, `k, v = kv_cache.insert_kv(i, k, v)` with shapes (B, H_kv, T, D) returns all keys and
values so far. The cache advances its own position after the last layer.
"""

import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import kernels
from nanochat.cpu_allocator import configure_cpu_allocator
from nanochat.common import NanochatError

ARCHS = ("nanochat", "qwen2")


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768          # the tokenizer's vocab size (never a guess)
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = None            # None -> n_head (no GQA)
    n_embd: int = 768
    arch: str = "nanochat"
    intermediate_size: int = None    # None -> 4*n_embd (nanochat), ~8/3*n_embd rounded to 64 (qwen2)
    rope_theta: float = None         # None -> 10000 (nanochat), 1e6 (qwen2)
    rms_eps: float = None            # None -> 1e-6 for both
    tie_embeddings: bool = False     # only allowed for qwen2
    softcap: float = None            # None -> 15 (nanochat), 0 = off (qwen2)
    pad_vocab_to: int = 64
    value_embeds: bool = False       # nanochat only: per-token value embeddings in alternate layers (ResFormer)
    smear: bool = False              # nanochat only: each position gets a gated share of the previous embedding

    def __post_init__(self):
        # Resolve the arch-dependent defaults so that asdict(config) is complete and explicit.
        if self.arch not in ARCHS:
            raise NanochatError(f"unknown arch {self.arch!r}; use one of {', '.join(ARCHS)}")
        qwen = self.arch == "qwen2"
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(8 * self.n_embd // 3, 64) if qwen else 4 * self.n_embd
        if self.rope_theta is None:
            self.rope_theta = 1e6 if qwen else 10000.0
        if self.rms_eps is None:
            self.rms_eps = 1e-6
        if self.softcap is None:
            self.softcap = 0.0 if qwen else 15.0
        self.validate()

    def validate(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "intermediate_size", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise NanochatError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise NanochatError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                                f"pick a head count that divides the width")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise NanochatError(f"model config: head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head != 0:
            raise NanochatError(f"model config: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.tie_embeddings and self.arch != "qwen2":
            raise NanochatError("model config: tied embeddings are only supported with --arch qwen2")
        for name in ("value_embeds", "smear"):
            if not isinstance(getattr(self, name), bool):
                raise NanochatError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
            if getattr(self, name) and self.arch != "nanochat":
                raise NanochatError(f"model config: {name} is only supported with --arch nanochat")
        if not (self.rope_theta > 0 and self.rms_eps > 0 and self.softcap >= 0):
            raise NanochatError("model config: rope_theta and rms_eps must be > 0 and softcap >= 0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        return _round_up(self.vocab_size, self.pad_vocab_to)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NanochatError(f"model config has unknown fields {unknown}; was it written by a newer nanochat?")
        return cls(**d)


def value_embed_layers(n_layer):
    """The layers that add a value embedding: every other one, counted back from the last."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


# The gates of value embeddings and smear read only the first channels of their input: a gate needs a
# hint of the token, not the whole vector, and a narrow gate costs nothing next to the block's matmuls.
VE_GATE_CHANNELS = 12
SMEAR_GATE_CHANNELS = 24
SMEAR_LR = 0.2


def _round_up(x, multiple):
    return ((x + multiple - 1) // multiple) * multiple


def heads_for_width(width):
    """nanochat's rule: one head per 128 channels (rounded up), i.e. head_dim ~128.
    When that count does not divide the width into even head dims (e.g. width 320 -> 3 heads),
    use the next head count that does (320 -> 4 heads of 80)."""
    n_head = max(1, math.ceil(width / 128))
    while width % n_head != 0 or (width // n_head) % 2 != 0:
        n_head += 1
    return n_head


def config_from_depth(depth, vocab_size, arch="nanochat", sequence_len=2048, **overrides):
    """Size a model from its depth: width = 64*depth, heads = ceil(width/128) (see heads_for_width).
    Any GPTConfig field can be overridden (None values are ignored)."""
    if not isinstance(depth, int) or depth <= 0:
        raise NanochatError(f"--depth must be a positive integer, got {depth!r}")
    width = overrides.pop("n_embd", None) or 64 * depth
    n_head = overrides.pop("n_head", None) or heads_for_width(width)
    kwargs = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                  n_embd=width, arch=arch)
    for key, value in overrides.items():
        if key not in {f.name for f in fields(GPTConfig)}:
            raise NanochatError(f"unknown model config override {key!r}")
        if value is not None:
            kwargs[key] = value
    return GPTConfig(**kwargs)


# -----------------------------------------------------------------------------
# Operations: the plain PyTorch op, or a hand-written kernel (nanochat/kernels.py) where it is faster.
# This section is the only place that chooses; under torch.compile it is always the plain op.

def _plain_rms_norm(x, eps):
    # The hand-written backward only pays off when there is a backward; decoding takes the fused op.
    if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return kernels.RMSNormCPU.apply(x, eps)
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rms_norm(x, weight=None, eps=1e-6):
    if weight is None:
        return _plain_rms_norm(x, eps)
    # As HF Qwen2RMSNorm: normalise in fp32, cast back, then scale by the weight.
    dtype = x.dtype
    return weight * _plain_rms_norm(x.float(), eps).to(dtype)


def apply_rotary(x, cos, sin):
    """HF's rotate_half convention. x: (B, T, H, D); cos/sin: (1, T, 1, D) with the two halves equal."""
    if torch.compiler.is_compiling():
        d = x.size(-1) // 2
        x1, x2 = x[..., :d], x[..., d:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    if not torch.is_grad_enabled():
        return kernels.rotate(x, cos, sin)  # no autograd.Function bookkeeping on the decode path
    return kernels.RotaryFn.apply(x, cos, sin)


def relu_squared(x):
    if torch.compiler.is_compiling():
        return F.relu(x).square()
    if not torch.is_grad_enabled():
        return torch.relu(x).square_()
    return kernels.ReluSquaredFn.apply(x)


def attention(q, k, v, gqa):
    """Causal attention of Tq new queries over Tk >= Tq keys (the first Tk - Tq are a cached prefix)."""
    Tq, Tk = q.size(2), k.size(2)
    if gqa:
        # enable_gqa is not supported by every SDPA backend/version; repeating is always correct.
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one new token sees everything so far
    # Prefill of several tokens after a cached prefix: query i (absolute pos Tk-Tq+i) sees keys <= it.
    prefix = Tk - Tq
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def use_fused_head_loss(x, softcap):
    """The fused soft-capped cross-entropy (kernels.SoftcapCrossEntropyCPU): fp32 on CPU, eager only
    (under autocast its backward's matmuls would meet bf16 operands)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
            and 0 < softcap <= kernels.SoftcapCrossEntropyCPU.MAX_SOFTCAP)


def _reduce_loss(losses, targets, reduction):
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != -1).sum()


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """Learnable RMSNorm (qwen2 only; nanochat uses the parameter-free rms_norm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.qk_norm = config.arch == "nanochat"
        self.rms_eps = config.rms_eps
        bias = config.arch == "qwen2"
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=bias)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        # value embeddings: v += gate(x) * ve(token), gate in (0, 2) per kv head (1 at init)
        has_ve = config.value_embeds and layer_idx in value_embed_layers(config.n_layer)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False) if has_ve else None

    def qkv_weight(self):
        """q, k and v weights stacked for one matmul (they stay separate parameters: HF names, Muon per
        matrix). Without grad (decoding) the stack is cached until a weight changes (its _version)."""
        params = [self.c_q.weight, self.c_k.weight, self.c_v.weight]
        if self.c_q.bias is not None:
            params += [self.c_q.bias, self.c_k.bias, self.c_v.bias]
        if torch.is_grad_enabled():
            return torch.cat(params[:3]), (torch.cat(params[3:]) if len(params) > 3 else None)
        key = tuple((p.data_ptr(), p._version, p.device) for p in params)
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w = torch.cat(params[:3])
                b = torch.cat(params[3:]) if len(params) > 3 else None
            cached = self._qkv_cache = (key, w, b)
        return cached[1], cached[2]

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        """x (B, T, C); ve (B, T, H_kv * D): this layer's value embedding of the tokens, or None."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        weight, bias = self.qkv_weight()
        # split, not slicing: the backward of a split is one concatenation of the parts' gradients,
        # that of each slice a zero-filled full-size gradient plus an add
        qk, v = F.linear(x, weight, bias).view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
        if ve is not None:
            gate = 2 * torch.sigmoid(F.linear(x[..., :self.ve_gate.in_features], self.ve_gate.weight))  # (B, T, Hkv)
            v = v + (gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)).to(v.dtype)
        qk = apply_rotary(qk, cos, sin)  # rotary (and QK-norm) on q and k together
        if self.qk_norm:
            qk = rms_norm(qk, eps=self.rms_eps)
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, H_kv, T_total, D)
        y = attention(q, k, v, gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    """nanochat: ReLU² (c_fc -> relu² -> c_proj). qwen2: SwiGLU (down(silu(gate) * up))."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.arch == "qwen2"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
            self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
            self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        else:
            self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
            self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.eps = config.rms_eps
        if config.arch == "qwen2":
            self.ln_1 = RMSNorm(config.n_embd, config.rms_eps)
            self.ln_2 = RMSNorm(config.n_embd, config.rms_eps)
        else:
            self.ln_1 = self.ln_2 = None

    def norm1(self, x):
        return self.ln_1(x) if self.ln_1 is not None else rms_norm(x, eps=self.eps)

    def norm2(self, x):
        return self.ln_2(x) if self.ln_2 is not None else rms_norm(x, eps=self.eps)

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache, ve)
        x = x + self.mlp(self.norm2(x))
        return x


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError("GPT(config) expects a GPTConfig")
        config.validate()
        self.config = config
        qwen = config.arch == "qwen2"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        if qwen:
            self.transformer["ln_f"] = RMSNorm(config.n_embd, config.rms_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # Optional extras that add parameters but almost no FLOPs (lookups and 1-row gates): worth most
        # to small models, whose per-token compute is what a budget limits.
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.padded_vocab_size, kv_dim)
                                           for i in value_embed_layers(config.n_layer)}) if config.value_embeds else None
        if config.smear:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        # Rotary tables cover 10x the training length so generation can run past it; they are
        # grown on demand beyond that. Non-persistent: recomputed on device, never checkpointed.
        cos, sin = self._rotary_tables(config.sequence_len * 10)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # --- initialisation -------------------------------------------------------

    def _rotary_tables(self, seq_len, device=None):
        """cos/sin of shape (1, seq_len, 1, head_dim), fp32, computed the way HF Qwen2 does."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        t = torch.arange(seq_len, dtype=torch.int64, device=device).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Fresh weights (also the way to materialise a model built on the meta device after to_empty)."""
        cfg = self.config
        device = self.lm_head.weight.device
        cos, sin = self._rotary_tables(cfg.sequence_len * 10, device=device)
        self.cos, self.sin = cos, sin
        if cfg.arch == "qwen2":
            # As HF: every Linear/Embedding N(0, 0.02), biases 0, norm weights 1.
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, 0.02)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
            return
        # nanochat: embeddings N(0, 1); head small; matrices uniform with std 1/sqrt(fan_in);
        # output projections of attention and MLP zero so each block starts as the identity.
        self.transformer.wte.weight.normal_(0.0, 1.0)
        self.lm_head.weight.normal_(0.0, 0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.weight.size(1))
                linear.weight.uniform_(-bound, bound)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.zero_()  # gate 1: v + ve
        if self.value_embeds is not None:
            bound = math.sqrt(3.0 / cfg.n_embd)  # as c_v's weights
            for table in self.value_embeds.values():
                table.weight.uniform_(-bound, bound)
        if cfg.smear:
            self.smear_gate.weight.zero_()
            self.smear_lambda.zero_()  # off at init; training opens it

    # --- accounting ---------------------------------------------------------------

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for forward+backward: 6 * (params except the embedding tables, lookups)
        plus attention's 12 * n_layer * n_head * head_dim * seq_len."""
        cfg = self.config
        nparams = self.num_params()
        if not cfg.tie_embeddings:
            nparams -= self.transformer.wte.weight.numel()
        if self.value_embeds is not None:
            nparams -= sum(p.numel() for p in self.value_embeds.parameters())
        return 6 * nparams + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len

    # --- forward ------------------------------------------------------------------

    def _rotary_slice(self, start, T):
        if start + T > self.cos.size(1):
            with torch.inference_mode(False):  # generate() runs in inference mode; training may follow
                cos, sin = self._rotary_tables(2 * (start + T), device=self.cos.device)
            self.cos, self.sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)
        return self.cos[:, start:start + T], self.sin[:, start:start + T]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx (B, T) int64. Returns logits (B, T, vocab_size) float32, or the loss if targets
        is given (targets == -1 are ignored; loss_reduction "mean" | "sum" | "none").
        last_only: logits of the last position only, (B, 1, vocab_size): all a generation's prefill
        needs, without the head's matmul and softcap over every prompt position."""
        cfg = self.config
        B, T = idx.shape
        start = kv_cache.get_pos() if kv_cache is not None else 0
        cos, sin = self._rotary_slice(start, T)
        x = self.transformer.wte(idx)
        if cfg.arch == "nanochat":
            x = rms_norm(x, eps=cfg.rms_eps)
        if cfg.smear:
            x = self._smear(x, kv_cache)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx) if self.value_embeds is not None and str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, ve)
        if cfg.arch == "qwen2":
            x = self.transformer.ln_f(x)
        else:
            x = rms_norm(x, eps=cfg.rms_eps)
        # Only the first vocab_size rows of the (padded) head: a contiguous view, no copy.
        head = self.lm_head.weight[:cfg.vocab_size]
        if targets is not None and loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be mean, sum or none, got {loss_reduction!r}")
        if targets is not None and use_fused_head_loss(x, cfg.softcap):
            losses = kernels.SoftcapCrossEntropyCPU.apply(x.reshape(B * T, -1), head, targets.reshape(-1), cfg.softcap)
            return _reduce_loss(losses.view(B, T), targets, loss_reduction)
        if last_only and targets is None:
            x = x[:, -1:]
        logits = F.linear(x, head).float()
        if cfg.softcap > 0:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    def _smear(self, x, kv_cache):
        """x (B, T, C), the normalised embeddings -> x[t] + lambda * sigmoid(gate(x[t])) * x[t-1].
        A sequence's first position has no predecessor; with a KV cache the predecessor of the first
        new position is the last one the cache saw (kv_cache.prev_embed)."""
        first = kv_cache.prev_embed if kv_cache is not None and kv_cache.get_pos() > 0 else None
        if kv_cache is not None:
            kv_cache.prev_embed = x[:, -1:]
        if first is None:
            cur, prev = x[:, 1:], x[:, :-1]
        else:
            cur, prev = x, torch.cat([first.to(x.dtype), x[:, :-1]], dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(
            F.linear(cur[..., :self.smear_gate.in_features], self.smear_gate.weight))  # (B, T', 1)
        mixed = cur + gate * prev
        return mixed if first is not None else torch.cat([x[:, :1], mixed], dim=1)

    # --- optimisers -----------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), scalar_lr=None):
        """Muon for the 2-D matrices inside blocks; AdamW for the embedding, the head and every
        1-D parameter (biases, norm weights; lr `scalar_lr`, default matrix_lr). AdamW learning rates
        scale with (n_embd/768)^-0.5 as in nanochat. Returns [adamw, muon]; under torch.distributed,
        the sharded DistAdamW/DistMuon. Every param group records `initial_lr` for schedulers."""
        from nanochat.common import is_ddp
        from nanochat.optim import Muon, DistMuon, AdamW, DistAdamW
        if self.lm_head.weight.device.type == "cpu":
            configure_cpu_allocator()
        matrix_params, scalar_params = [], []
        for block in self.transformer.h:
            for p in block.parameters():
                (matrix_params if p.ndim == 2 else scalar_params).append(p)
        for name, p in self.transformer.named_parameters():
            if not name.startswith("h.") and name != "wte.weight":
                scalar_params.append(p)  # final norm weight (qwen2)
        embedding_params = [self.transformer.wte.weight]
        head_params = [] if self.config.tie_embeddings else [self.lm_head.weight]
        value_embed_params = list(self.value_embeds.parameters()) if self.value_embeds is not None else []
        smear_params = [self.smear_gate.weight, self.smear_lambda] if self.config.smear else []
        all_ids = {id(p) for p in self.parameters()}
        grouped = matrix_params + scalar_params + embedding_params + head_params + value_embed_params + smear_params
        assert len(grouped) == len(all_ids) and {id(p) for p in grouped} == all_ids, "a parameter has no optimizer"
        scale = (self.config.n_embd / 768) ** -0.5
        scalar_lr = matrix_lr if scalar_lr is None else scalar_lr
        adam_groups = [dict(params=embedding_params, lr=embedding_lr * scale)]
        if head_params:
            adam_groups.append(dict(params=head_params, lr=unembedding_lr * scale))
        if scalar_params:
            adam_groups.append(dict(params=scalar_params, lr=scalar_lr * scale))
        if value_embed_params:  # half the token embedding's LR, as newer nanochat
            adam_groups.append(dict(params=value_embed_params, lr=0.5 * embedding_lr * scale))
        if smear_params:        # a gate and a scalar: a fixed LR, as newer nanochat
            adam_groups.append(dict(params=smear_params, lr=SMEAR_LR))
        ddp = is_ddp()
        adamw = (DistAdamW if ddp else AdamW)(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = (DistMuon if ddp else Muon)(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # --- naive generation (the reference for engine.py) -------------------------------

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Yield up to max_tokens sampled ids after the prompt `tokens` (list of ints), recomputing
        the full (windowed to sequence_len) context every step; temperature 0 is greedy."""
        if not tokens:
            raise ValueError("generate() needs at least one prompt token")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise NanochatError(f"prompt has token id {max(tokens)} outside the model's vocab of "
                                f"{self.config.vocab_size}; was it encoded with another tokenizer?")
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.config.sequence_len:])[:, -1, :]
            next_id = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> (B, 1) ids. temperature 0: argmax; top_k: sample among the k best."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
