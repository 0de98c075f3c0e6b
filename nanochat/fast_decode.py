"""
One decoding step (one new token per row) of a nanochat-arch GPT, written out flat.

Why: at the sizes a CPU decodes (d4-d20, batch 1-16) a step is a handful of small matmuls plus ~150
tiny ops, and a profile of `GPT.forward` at T=1 shows the tiny ops, module calls and the generic
attention kernel costing as much as the matmuls (dev/BENCHMARKS.md, "Decode profile"). This path
computes exactly what `GPT.forward(ids (B, 1), kv_cache)[:, -1]` computes, but on 2-D (B, C)
activations with fewer, cheaper ops: RMSNorm in 4 small ops, the stacked q/k/v weight, QK-norm on q
and k together, rotary as one (D, D) matmul, keys/values written straight into the preallocated
cache at the current position, attention of the single query by SDPA over the cached prefix
(grouped-query heads by a view, never a copy), ReLU² and the residual adds in place, and matrices
laid out for x @ W (see DecodeWeights). Optional reduced-precision weights
(`weights_dtype=torch.bfloat16`): every matmul reads bf16 weights (half the bytes per token, which
is what bounds a large model's decode on a CPU), activations stay fp32.
tests/test_fast_decode.py checks it against the plain forward.
"""

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


class DecodeWeights:
    """The matrices one step reads, prepared once and rebuilt when any parameter changes (its
    version counter), as gpt's own q/k/v cache does.
    - Small fp32 models: every matrix is stored transposed and contiguous, (in, out), because on
      CPU `x @ Wt` with 1..16 rows is 1.3-2x faster than F.linear on the (out, in) weight
      (dev/BENCHMARKS.md); that is a second copy of the weights.
    - Large fp32 models: the model's own (out, in) weights, no copy.
    - `weights_dtype` (e.g. torch.bfloat16): an (out, in) copy in that dtype, whatever the size: half
      the bytes per token, which is what bounds a large model's decode on a CPU. (For bf16, oneDNN's
      (out, in) kernels read faster than x @ Wt: 40 vs 30 GB/s on a d20 matrix.)"""

    def __init__(self, model, weights_dtype=None):
        self.model = model
        self.dtype = weights_dtype
        self.transposed = (weights_dtype is None and model.lm_head.weight.dtype == torch.float32
                           and model.num_params() <= TRANSPOSED_COPY_MAX_PARAMS)
        self.key = None
        self.layers = None
        self.head = None

    def _version(self):
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _prep(self, w):
        if self.transposed:
            return w.t().contiguous()
        return w if self.dtype is None else w.to(self.dtype).contiguous()

    @torch.no_grad()
    def get(self):
        key = self._version()
        if key != self.key:
            prep, layers = self._prep, []
            for block in self.model.transformer.h:
                a, m = block.attn, block.mlp
                qkv = a.qkv_weight()[0]  # q, k, v stacked (cached by the attention module)
                layers.append((prep(qkv), prep(a.c_proj.weight), prep(m.c_fc.weight), prep(m.c_proj.weight)))
            self.layers = layers
            self.head = prep(self.model.lm_head.weight[:self.model.config.vocab_size])
            self.key = key
        return self.layers, self.head

    def matmul(self, x, w):
        """x (N, in) times a prepared matrix -> (N, out) in x's dtype (the multiply runs in the
        weights' dtype: a bf16 copy multiplies in bf16)."""
        if self.transposed:
            return torch.mm(x, w)
        if w.dtype != x.dtype:
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)


def _rms(x, root_eps):
    """F.rms_norm(x, eps) over the last dim in 4 small ops instead of its ~8 on CPU:
    x * rsqrt(mean(x^2) + eps) = x / hypot(||x|| / sqrt(dim), sqrt(eps)); root_eps: a 0-d tensor."""
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).mul_(x.size(-1) ** -0.5)
    return x / torch.hypot(rms, root_eps)


_ROTATION_BASIS = {}


def _rotation(cos, sin):
    """The (D, D) matrix M with x @ M = rotary(x) = x * cos + rotate_half(x) * sin at one position:
    one small matmul per layer instead of ~6 elementwise ops, built once per step in 2 ops from
    the identity and rotate_half's signed permutation P (x @ P = rotate_half(x) = (-x2, x1))."""
    D = cos.size(0)
    key = (D, cos.device)
    if key not in _ROTATION_BASIS:
        d = D // 2
        P = torch.zeros(D, D, device=cos.device)
        P[d:, :d] = -torch.eye(d, device=cos.device)  # output j < d takes -x[j + d]
        P[:d, d:] = torch.eye(d, device=cos.device)   # output j >= d takes x[j - d]
        _ROTATION_BASIS[key] = (torch.eye(D, device=cos.device), P)
    eye, P = _ROTATION_BASIS[key]
    return torch.addcmul(eye * cos, P, sin)


@torch.inference_mode()
def decode_step(model, weights, ids, cache):
    """ids (B,) int64, the newest token of every row; cache: engine.KVCache already holding the
    prefix (pos > 0). Appends this token's keys/values to the cache and returns the next-token
    logits (B, vocab_size) fp32, soft-capped as GPT.forward returns them. Activations are in the
    dtype the prefill computed in (the cache's): fp32, or e.g. bf16 for a model cast to bf16."""
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B, pos = ids.size(0), cache.pos
    if pos + 1 > cache.max_len:
        raise NanochatError(f"KV cache overflow: {pos + 1} positions into a cache of {cache.max_len}")
    layers, head = weights.get()
    mm = weights.matmul
    cos, sin = model._rotary_slice(pos, 1)
    dtype = cache.k.dtype
    rotation = _rotation(cos.view(D).float(), sin.view(D).float()).to(dtype)
    if dtype == torch.float32:
        root_eps = torch.tensor(cfg.rms_eps ** 0.5, device=ids.device)
        norm = lambda t: _rms(t, root_eps)  # noqa: E731
    else:  # reduced precision: torch's rms_norm, which normalises in fp32 as GPT.forward does
        norm = lambda t: F.rms_norm(t, (t.size(-1),), eps=cfg.rms_eps)  # noqa: E731

    x = norm(F.embedding(ids, model.transformer.wte.weight).to(dtype))  # (B, C), the embedding's RMSNorm
    for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(layers):
        qkv = mm(norm(x), w_qkv).view(B, H + 2 * Hkv, D)
        # QK-norm commutes with the rotation (a rotation keeps norms): normalise, then rotate
        qk = torch.mm(norm(qkv[:, :H + Hkv]).view(-1, D), rotation).view(B, H + Hkv, D)
        layer_k, layer_v = cache.k[i], cache.v[i]  # (B, Hkv, T_max, D)
        layer_k.select(2, pos).copy_(qk[:, H:])
        layer_v.select(2, pos).copy_(qkv[:, H + Hkv:])
        keys, values = layer_k.narrow(2, 0, pos + 1), layer_v.narrow(2, 0, pos + 1)
        # the rep = H / Hkv query heads sharing a key/value head are rep "queries" of that head
        q = qk[:, :H].view(B, Hkv, H // Hkv, D)
        y = F.scaled_dot_product_attention(q, keys, values).view(B, H * D)
        x += mm(y, w_o)
        x += mm(mm(norm(x), w_fc).relu_().square_(), w_proj)
    cache.pos = pos + 1
    logits = mm(norm(x), head).float()
    if cfg.softcap > 0:
        logits.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
    return logits
