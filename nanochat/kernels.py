"""
Hand-written autograd kernels for the model's hot operations.

Why: on CPU, autograd runs every elementwise op of RMSNorm, rotary, ReLU² and the soft-capped
cross-entropy as a separate pass over memory with its own temporaries, and at the sizes of a CPU
run (d4, a few thousand tokens per step) those passes, not the matmuls, decide the step time. Each
autograd.Function below does the same arithmetic in fewer passes, saving only what its backward
needs. They compute exactly what the plain PyTorch ops compute (tests/test_kernels.py checks each
against the plain path, values and gradients); gpt.py chooses between the two in one place (its
"Operations" section), and torch.compile always gets the plain ops, which it fuses itself.
"""

import torch


class RMSNormCPU(torch.autograd.Function):
    """Parameter-free RMSNorm over the last dim with a hand-written backward. On CPU, torch's
    F.rms_norm backward is a long chain of unfused ops (tens of ms per call at d4 sizes);
    this is ~4 passes: grad_x = r * (g - y * mean(g * y)), with y = x * r, r = 1/rms(x)."""

    @staticmethod
    def forward(ctx, x, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        c = (g * y).mean(dim=-1, keepdim=True)
        return torch.addcmul(g, y, c, value=-1).mul_(r), None


def rotate(x, cos, sin, inverse=False):
    """y1 = x1*cos - x2*sin, y2 = x2*cos + x1*sin (HF's x*cos + rotate_half(x)*sin), written in
    place into one output without the cat/neg temporaries; inverse=True rotates back (= backward)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[..., :d], sin[..., :d]
    y = torch.empty_like(x)
    y1, y2 = y[..., :d], y[..., d:]
    sign = 1 if inverse else -1
    torch.mul(x1, c, out=y1).addcmul_(x2, s, value=sign)
    torch.mul(x2, c, out=y2).addcmul_(x1, s, value=-sign)
    return y


class RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return rotate(g, cos, sin, inverse=True), None, None


class ReluSquaredFn(torch.autograd.Function):
    """relu(x)^2 keeping only relu(x) for backward (grad = 2 * relu(x) * g): 2 passes forward and 1
    backward, instead of autograd's relu + pow + pow-backward + threshold-backward."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return torch.addcmul(r.new_zeros(()), r, g, value=2.0)  # 0 + 2 * r * g: one pass


class SoftcapCrossEntropyCPU(torch.autograd.Function):
    """Per-token loss of softcap * tanh(x @ W^T / softcap) against targets (-1: loss 0, no grad),
    fused for CPU, where every pass over the (tokens x vocab) logits costs memory bandwidth.
    Forward: t = tanh((x / softcap) @ W^T) in place, e = exp(softcap * t) and its row sums (no
    max-subtraction needed: |logits| <= softcap <= 30 cannot overflow fp32). Backward: with
    p = e / sumexp, d loss / d (x @ W^T) = (p - onehot) * (1 - t^2), so
        grad_x = r * (E' @ W) - c * W[target],  grad_W = E'^T @ (r * x) - scatter(c * x)
    where E' = e * (1 - t^2) (written over t in place), r = grad / sumexp and c = grad * (1 - t_target^2)
    are per-row: the row scalings and the one-hot part move to the small (tokens x width) side.
    6 passes over the logits in all, against ~12 plus temporaries for autograd."""
    CHUNK = 1024  # rows per chunk: few, large ops (each is a parallel region)
    MAX_SOFTCAP = 30.0

    @staticmethod
    def forward(ctx, x, W, targets, softcap):
        assert softcap <= SoftcapCrossEntropyCPU.MAX_SOFTCAP
        N = x.size(0)
        t = torch.mm(x * (1.0 / softcap), W.t())  # (N, V) = logits / softcap before the tanh
        e = torch.empty_like(t)
        sumexp = x.new_empty(N)
        for s in range(0, N, SoftcapCrossEntropyCPU.CHUNK):
            stop = s + SoftcapCrossEntropyCPU.CHUNK
            tc, ec = t[s:stop], e[s:stop]
            tc.tanh_()
            torch.mul(tc, softcap, out=ec).exp_()
            torch.sum(ec, dim=1, out=sumexp[s:stop])
        valid = targets != -1
        safe = targets.clamp_min(0)
        t_target = t.gather(1, safe[:, None]).squeeze(1)
        losses = (sumexp.log() - t_target * softcap) * valid
        ctx.save_for_backward(x, W, t, e, sumexp, t_target, safe, valid)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused CPU cross-entropy reuses its saved buffers: backward can run only once "
                               "(no retain_graph=True through the loss)")
        ctx.consumed = True
        x, W, t, e, sumexp, t_target, safe, valid = ctx.saved_tensors
        g = grad_losses * valid                    # (N,), ignored rows get nothing
        r = (g / sumexp)[:, None]                  # softmax normalisation, per row
        c = (g * (1 - t_target * t_target))[:, None]  # one-hot part, per row
        for s in range(0, x.size(0), SoftcapCrossEntropyCPU.CHUNK):
            stop = s + SoftcapCrossEntropyCPU.CHUNK
            tc, ec = t[s:stop], e[s:stop]
            tc.mul_(tc)
            torch.addcmul(ec, ec, tc, value=-1, out=tc)  # e * (1 - t^2)
        grad_x = torch.mm(t, W).mul_(r).sub_(c * W[safe])
        grad_W = torch.mm(t.t(), x * r).index_add_(0, safe, c * x, alpha=-1)
        return grad_x, grad_W, None, None
