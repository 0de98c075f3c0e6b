"""
One decoding step (one new token per row) of a nanochat-arch GPT, written out flat.

Why: at the sizes a CPU decodes (d4-d20, batch 1-16) a step is a handful of small matmuls plus ~100
tiny ops, and a profile of `GPT.forward` at T=1 shows the tiny ops, module calls and the generic
attention kernel costing as much as the matmuls (dev/BENCHMARKS.md, "Decode profile"). Inside a
step each tiny op costs 10-25 us rather than the 2-5 us it costs in a loop of its own (the weights
streamed by the matmuls evict its code and data from the caches, and the matmuls' second OpenMP
thread spins meanwhile on a core that may share the first one's execution units: a spinning sibling
slowed a tiny op by ~55% on our 2-vCPU VM), so the count of ops is what this file minimises. It
computes what `GPT.forward(ids (B, 1), kv_cache)[:, -1]` computes, on 2-D (B, C) activations:
- RMSNorm in 3 ops: rms_norm(x) = sqrt(C) * x / hypot(||x||, sqrt(C * eps)); the constant sqrt(C)
  is folded into the prepared copy of the matrix that reads the normalised x (DecodeWeights);
- the embedding's RMSNorm precomputed once per weights (a normalised copy of the table);
- the stacked q/k/v weight; QK-norm on q and k together, then rotary as one (D, D) matmul whose
  matrices are built for a block of positions at once (RotaryMatrices);
- keys/values written straight into the preallocated cache (one index_copy_ each), attention of the
  single query by SDPA over the cached prefix (grouped-query heads by a view, never a copy);
- the matmuls write into buffers made once per cache, with the views the step reads them through
  (q, k, v heads, the query groups) made there too (StepBuffers): no view, split or allocation per
  step for them, which took a d4 step from 131 ops to 97;
- ReLU² and the residual adds in place; the 1/softcap of the logits folded into the head's copy;
- matrices laid out for x @ W on small models;
- a model's value embeddings and smear (GPTConfig) as the forward applies them, their gates reading
  the same normalised activations (with the folded sqrt(C) carried by the prepared gate weight).
Optional reduced-precision weights (`weights_dtype=torch.bfloat16`): every matmul reads bf16 weights
(half the bytes per token, which is what bounds a large model's decode on a CPU), activations stay
fp32. tests/test_fast_decode.py checks it against the plain forward.
"""

import collections

import torch
import torch.nn.functional as F

from nanochat.common import NanochatError
from nanochat.gpt import GPT


def supports(model):
    """The flat step covers our GPT with the nanochat arch (qwen2, and stand-in models in tests,
    decode through their own forward)."""
    return isinstance(model, GPT) and model.config.arch == "nanochat"


# fp32 models up to this many parameters get a transposed copy of their matrices (DecodeWeights);
# larger ones (d20: 560M) read their own weights, where the layout matters little (bandwidth-bound).
TRANSPOSED_COPY_MAX_PARAMS = 100_000_000


# -----------------------------------------------------------------------------
# Weights and constants, prepared once per version of the model's parameters

Prepared = collections.namedtuple("Prepared", "layers head embed transposed folded consts rotary value_embeds smear")
Prepared.__doc__ = """What one step reads.
layers: per block (w_qkv, w_o, w_fc, w_proj); head: the output matrix (vocab_size rows only);
embed: the RMS-normalised embedding table, or None (normalised per step); transposed: matrices are
(in, out); folded: the matrices after a norm carry its sqrt(C), the head also 1/softcap; consts:
0-d tensors (a Python float operand costs a scalar-to-tensor copy per op); rotary: RotaryMatrices;
value_embeds: per block (table, gate weight (Hkv, K) read as x[:, :K] @ gate.T) or None; smear: (gate
weight (1, K), lambda) or None. Each gate weight carries the sqrt(C) when the matrices are folded."""


class DecodeWeights:
    """The matrices one step reads, prepared by `get()` and rebuilt when any parameter changes (its
    version counter), as gpt's own q/k/v cache does. `get()` checks every parameter, so a caller
    gets it once per generation, not once per step.
    - Small fp32 models: every matrix is stored transposed and contiguous, (in, out), because on
      CPU `x @ Wt` with 1..16 rows is 1.3-2x faster than F.linear on the (out, in) weight
      (dev/BENCHMARKS.md); that is a second copy of the weights, plus a normalised embedding table.
    - Large fp32 models: the model's own (out, in) weights, no copy.
    - `weights_dtype` (e.g. torch.bfloat16): an (out, in) copy in that dtype, whatever the size: half
      the bytes per token, which is what bounds a large model's decode on a CPU. (For bf16, oneDNN's
      (out, in) kernels read faster than x @ Wt: 40 vs 30 GB/s on a d20 matrix.)
    Whenever a copy is made of an fp32 model's weights, the norms' sqrt(C) and 1/softcap go into it."""

    def __init__(self, model, weights_dtype=None):
        self.model = model
        self.dtype = weights_dtype
        fp32 = model.lm_head.weight.dtype == torch.float32
        self.transposed = weights_dtype is None and fp32 and model.num_params() <= TRANSPOSED_COPY_MAX_PARAMS
        self.folded = fp32 and (self.transposed or weights_dtype is not None)
        self.key = None
        self.prepared = None

    def _version(self):
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    @torch.no_grad()
    def get(self):
        key = self._version()
        if key != self.key:
            self.prepared = self._build()
            self.key = key
        return self.prepared

    def _prep(self, w, scale=1.0):
        if self.folded and scale != 1.0:
            w = w * scale
        if self.transposed:
            return w.t().contiguous()
        return w if self.dtype is None else w.to(self.dtype).contiguous()

    def _build(self):
        model, cfg = self.model, self.model.config
        root_c = cfg.n_embd ** 0.5
        layers = []
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            qkv = a.qkv_weight()[0]  # q, k, v stacked (cached by the attention module)
            layers.append((self._prep(qkv, root_c), self._prep(a.c_proj.weight),
                           self._prep(m.c_fc.weight, root_c), self._prep(m.c_proj.weight)))
        head_scale = root_c / cfg.softcap if cfg.softcap > 0 else root_c
        head = self._prep(model.lm_head.weight[:cfg.vocab_size], head_scale)
        wte = model.transformer.wte.weight
        embed = F.rms_norm(wte, (cfg.n_embd,), eps=cfg.rms_eps) if self.transposed else None
        const = lambda v: torch.tensor(v, dtype=torch.float32, device=wte.device)  # noqa: E731
        consts = {"root_c": const(root_c), "root_c_eps": const((cfg.n_embd * cfg.rms_eps) ** 0.5),
                  "root_d_eps": const((cfg.head_dim * cfg.rms_eps) ** 0.5), "softcap": const(cfg.softcap)}
        gate_scale = root_c if self.folded else 1.0  # a gate reads norm_in(x), which lacks the folded sqrt(C)
        value_embeds = [None] * len(layers)
        if model.value_embeds is not None:
            for key, table in model.value_embeds.items():
                block = model.transformer.h[int(key)]
                value_embeds[int(key)] = (table.weight, block.attn.ve_gate.weight * gate_scale)
        smear = (model.smear_gate.weight, model.smear_lambda) if cfg.smear else None
        return Prepared(layers, head, embed, self.transposed, self.folded, consts, RotaryMatrices(model),
                        value_embeds, smear)


def matmul(prepared, x, w):
    """x (N, in) times a prepared matrix -> a new (N, out) tensor (a reduced-precision copy
    multiplies in its own dtype, and so does its result)."""
    if w.dtype != x.dtype:
        return F.linear(x.to(w.dtype), w)
    return torch.mm(x, w if prepared.transposed else w.t())


def matmul_into(prepared, x, w, out):
    """out (N, out) = x (N, in) times a prepared matrix, in out's dtype (a reduced-precision copy
    multiplies in its own dtype)."""
    if w.dtype != x.dtype:
        return out.copy_(F.linear(x.to(w.dtype), w))
    return torch.mm(x, w if prepared.transposed else w.t(), out=out)


def add_matmul_(prepared, out, x, w):
    """out += x @ (prepared matrix), in one op where the dtypes agree (the residual adds)."""
    if w.dtype != out.dtype:
        return out.add_(F.linear(x.to(w.dtype), w))
    return out.addmm_(x, w if prepared.transposed else w.t())


# -----------------------------------------------------------------------------
# Rotary embedding as a matrix per position

class RotaryMatrices:
    """For position p the (D, D) matrix M_p with x @ M_p = rotary(x) at p = x * cos + rotate_half(x) * sin,
    scaled by `scale` (the sqrt(D) of a QK-norm done in 3 ops). With P the signed permutation of
    rotate_half (x @ P = (-x2, x1)): M_p = diag(cos_p) + P diag(sin_p). Built for BLOCK positions at
    once (3 ops per block instead of per step), the most recent blocks kept (a chat revisits the
    same positions in every turn); a block of D=128 matrices is 2 MB."""

    BLOCK = 32
    KEEP_BLOCKS = 8

    def __init__(self, model):
        self.model = model
        self.blocks = collections.OrderedDict()
        self.basis = {}

    def _basis(self, D, device):
        if device not in self.basis:
            d = D // 2
            P = torch.zeros(D, D, device=device)
            P[d:, :d] = -torch.eye(d, device=device)  # output j < d takes -x[j + d]
            P[:d, d:] = torch.eye(d, device=device)   # output j >= d takes x[j - d]
            self.basis[device] = (torch.eye(D, device=device), P)
        return self.basis[device]

    def at(self, pos, dtype, scale):
        """M_pos * scale, (D, D) in dtype."""
        b = pos // self.BLOCK
        key = (b, dtype, scale)
        block = self.blocks.get(key)
        if block is None:
            cos, sin = self.model._rotary_slice(b * self.BLOCK, self.BLOCK)  # (1, BLOCK, 1, D)
            D = cos.size(-1)
            cos, sin = cos.view(-1, 1, D).float() * scale, sin.view(-1, 1, D).float() * scale
            eye, P = self._basis(D, cos.device)
            block = torch.addcmul(eye * cos, P, sin).to(dtype)  # (BLOCK, D, D)
            self.blocks[key] = block
            while len(self.blocks) > self.KEEP_BLOCKS:
                self.blocks.popitem(last=False)
        return block[pos - b * self.BLOCK]


# -----------------------------------------------------------------------------
# The step

class StepBuffers:
    """The outputs a step writes, allocated once per cache (and batch size) with every view the step
    reads them through made here, so that the step itself runs no view, split or allocation for them
    (each such op costs a few microseconds, and a step at d4 is ~100 ops). One set serves every layer:
    a layer has consumed its q/k/v and hidden activations before the next one overwrites them.
    Rebuilt when the cache's tensors change (Engine drops finished rows with KVCache.keep_rows)."""

    def __init__(self, cfg, cache):
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        k, B = cache.k, cache.batch_size
        self.owner = k
        self.keys, self.values = cache.k.unbind(0), cache.v.unbind(0)  # per layer (B, Hkv, T_max, D)
        empty = lambda *shape: torch.empty(shape, dtype=k.dtype, device=k.device)  # noqa: E731
        self.qkv = empty(B, (H + 2 * Hkv) * D)               # x @ w_qkv: q, k, v heads side by side
        heads = self.qkv.view(B, H + 2 * Hkv, D)
        self.qk = heads[:, :H + Hkv]                          # (B, H+Hkv, D), QK-normed into:
        self.qk_normed = empty(B * (H + Hkv), D)
        self.qk_normed_heads = self.qk_normed.view(B, H + Hkv, D)
        self.qk_norms = empty(B, H + Hkv, 1)
        self.v_new = heads[:, H + Hkv:].unsqueeze(2)          # (B, Hkv, 1, D)
        self.rotated = empty(B * (H + Hkv), D)                # qk_normed @ rotation
        rotated = self.rotated.view(B, H + Hkv, D)
        # the rep = H / Hkv query heads sharing a key/value head are rep "queries" of that head
        self.q = rotated[:, :H].view(B, Hkv, H // Hkv, D)
        self.k_new = rotated[:, H:].unsqueeze(2)              # (B, Hkv, 1, D)
        self.hidden = empty(B, cfg.intermediate_size)         # the MLP's activations
        self.pos = torch.zeros(1, dtype=torch.long, device=k.device)  # where this step's k/v go

    @classmethod
    def of(cls, cfg, cache):
        buffers = cache.step_buffers
        if buffers is None or buffers.owner is not cache.k:
            buffers = cache.step_buffers = cls(cfg, cache)
        return buffers


def _scaled_rms(x, root_k_eps):
    """rms_norm(x) / sqrt(K) over the last dim K, in 3 ops: x / hypot(||x||, sqrt(K * eps))."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).hypot_(root_k_eps)


def _smear(x, cache, gate_w, lam):
    """x (B, C), this token's normalised embedding -> x + lambda * sigmoid(gate(x)) * the previous one
    (GPT._smear); the cache keeps this token's embedding for the next step."""
    prev = cache.prev_embed
    cache.prev_embed = x.unsqueeze(1)
    if prev is None:
        return x
    gate = lam.to(x.dtype) * torch.sigmoid(F.linear(x[:, :gate_w.size(1)], gate_w.to(x.dtype)))  # (B, 1)
    return x + gate * prev.view_as(x).to(x.dtype)


@torch.inference_mode()
def decode_step(model, prepared, ids, cache):
    """ids (B,) int64, the newest token of every row; prepared: DecodeWeights.get(); cache:
    engine.KVCache already holding the prefix (pos > 0). Appends this token's keys/values to the
    cache and returns the next-token logits (B, vocab_size) fp32, soft-capped as GPT.forward returns
    them. Activations are in the dtype the prefill computed in (the cache's): fp32, or e.g. bf16 for
    a model cast to bf16."""
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B, pos = ids.size(0), cache.pos
    if pos + 1 > cache.max_len:
        raise NanochatError(f"KV cache overflow: {pos + 1} positions into a cache of {cache.max_len}")
    c = prepared.consts
    dtype = cache.k.dtype
    buf = StepBuffers.of(cfg, cache)
    if dtype == torch.float32:
        # norm_in(x): what a matmul reads (its matrix may carry the sqrt(C)); QK-norm / sqrt(D), whose
        # sqrt(D) the rotation matrix carries, is written into buf.qk_normed
        if prepared.folded:
            norm_in = lambda t: _scaled_rms(t, c["root_c_eps"])  # noqa: E731
        else:
            norm_in = lambda t: _scaled_rms(t, c["root_c_eps"]).mul_(c["root_c"])  # noqa: E731

        def qk_norm():
            norms = torch.linalg.vector_norm(buf.qk, dim=-1, keepdim=True, out=buf.qk_norms)
            torch.div(buf.qk, norms.hypot_(c["root_d_eps"]), out=buf.qk_normed_heads)
        rotation = prepared.rotary.at(pos, dtype, D ** 0.5)
    else:  # reduced precision: torch's rms_norm, which normalises in fp32 as GPT.forward does
        if prepared.folded:
            raise ValueError("weights prepared for an fp32 model cannot decode a cache of another dtype")
        norm_in = lambda t: F.rms_norm(t, (t.size(-1),), eps=cfg.rms_eps)  # noqa: E731

        def qk_norm():
            buf.qk_normed_heads.copy_(F.rms_norm(buf.qk, (D,), eps=cfg.rms_eps))
        rotation = prepared.rotary.at(pos, dtype, 1.0)

    if prepared.embed is not None:
        x = F.embedding(ids, prepared.embed)  # (B, C), already RMS-normalised
    else:
        x = F.rms_norm(F.embedding(ids, model.transformer.wte.weight).to(dtype), (cfg.n_embd,), eps=cfg.rms_eps)
    if prepared.smear is not None:
        x = _smear(x, cache, *prepared.smear)
    buf.pos.fill_(pos)
    for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(prepared.layers):
        xn = norm_in(x)
        matmul_into(prepared, xn, w_qkv, buf.qkv)
        # QK-norm commutes with the rotation (a rotation keeps norms): normalise, then rotate
        qk_norm()
        torch.mm(buf.qk_normed, rotation, out=buf.rotated)
        v = buf.v_new
        if prepared.value_embeds[i] is not None:
            table, gate_w = prepared.value_embeds[i]
            gate = torch.sigmoid(F.linear(xn[:, :gate_w.size(1)], gate_w.to(xn.dtype))).mul_(2)  # (B, Hkv)
            v = torch.addcmul(v, gate.view(B, Hkv, 1, 1), F.embedding(ids, table).to(dtype).view(B, Hkv, 1, D))
        keys, values = buf.keys[i], buf.values[i]
        keys.index_copy_(2, buf.pos, buf.k_new)
        values.index_copy_(2, buf.pos, v)
        y = F.scaled_dot_product_attention(buf.q, keys.narrow(2, 0, pos + 1), values.narrow(2, 0, pos + 1))
        add_matmul_(prepared, x, y.view(B, H * D), w_o)
        matmul_into(prepared, norm_in(x), w_fc, buf.hidden)
        add_matmul_(prepared, x, buf.hidden.relu_().square_(), w_proj)
    cache.pos = pos + 1
    logits = matmul(prepared, norm_in(x), prepared.head).float()
    if cfg.softcap > 0:  # softcap * tanh(logits / softcap); a folded head already divided
        if not prepared.folded:
            logits.div_(c["softcap"])
        logits.tanh_().mul_(c["softcap"])
    return logits
