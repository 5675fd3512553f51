"""Mixed-precision AdamW for bf16 models, as Megatron does it: fp32 master weights and fp32 moments.

The model's weights, activations and gradients are bf16. The optimizer keeps an fp32 master copy of
each weight and fp32 AdamW moments, clips the global gradient norm, steps the masters and writes the
bf16 weights back. With gradient accumulation, each micro-batch's bf16 gradients are added into fp32
buffers (`accumulate()`), so that the sum is not rounded to bf16 at every micro-batch.

Two implementations of the same step:
- `torch`: per chunk of parameters, the gradients are cast to fp32, torch's AdamW (fused on CUDA)
  steps the masters, and the masters are copied to the bf16 weights. About 46 bytes of memory
  traffic per parameter, in four passes.
- `triton` (CUDA): one kernel per parameter reads the gradient (bf16, or the fp32 accumulator),
  applies the clip scale, updates master, m and v in fp32 and writes the bf16 weight in one pass:
  28 bytes per parameter. `check_triton()` compares it with the `torch` one.

Needs torch alone; Triton only for the `triton` implementation.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the `torch` implementation only
    triton = None

if triton is not None:

    @triton.jit
    def _adamw_master_kernel(p_ptr, g_ptr, w_ptr, m_ptr, v_ptr, scale_ptr, n, lr, beta1, beta2, eps, wd,
                             step_size, bc2_sqrt, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        # the order of torch's fused AdamW: decoupled decay, moments, bias-corrected step
        w = w - lr * wd * w
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(w_ptr + offs, w, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)


class MasterAdamW:
    """fp32 master weights and AdamW moments for bf16 (or any) parameters."""

    def __init__(self, params, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 chunk_elems: int = 1 << 28, impl: str = "auto"):
        self.params = [p for p in params if p.requires_grad]
        cuda = self.params[0].is_cuda
        if impl == "auto":
            impl = "triton" if cuda and triton is not None else "torch"
        if impl == "triton" and (not cuda or triton is None):
            raise ValueError(f"MasterAdamW impl ({impl!r}) needs CUDA parameters and Triton")
        self.impl, self.lr, self.weight_decay, self.betas, self.eps = impl, lr, weight_decay, betas, eps
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.accumulated = False
        self.steps = 0
        if impl == "triton":
            self.exp_avg = [torch.zeros_like(m) for m in self.masters]
            self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
            return
        self.chunks, cur, size = [], [], 0
        for i, p in enumerate(self.params):
            cur.append(i)
            size += p.numel()
            if size >= chunk_elems:
                self.chunks.append(cur)
                cur, size = [], 0
        if cur:
            self.chunks.append(cur)
        self.opts = [torch.optim.AdamW([self.masters[i] for i in c], lr=lr, weight_decay=weight_decay, betas=betas,
                                       eps=eps, fused=cuda) for c in self.chunks]

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the bf16 gradients of one micro-batch into the fp32 accumulators, and free them."""
        pairs = [(m, p.grad) for m, p in zip(self.masters, self.params) if p.grad is not None]
        old = [(m, g) for m, g in pairs if m.grad is not None]
        if old:
            torch._foreach_add_([m.grad for m, _ in old], [g for _, g in old])
        for m, g in pairs:
            if m.grad is None:
                m.grad = g.float()
        for p in self.params:
            p.grad = None
        self.accumulated = True

    @torch.no_grad()
    def step(self, max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm`, step, write the weights; returns the norm."""
        self.steps += 1
        holders = self.masters if self.accumulated else self.params  # whose .grad is the gradient
        norm = self._step_triton(holders, max_norm) if self.impl == "triton" else self._step_torch(holders, max_norm)
        for t in (*self.params, *self.masters):
            t.grad = None
        self.accumulated = False
        return float(norm)

    def _step_torch(self, holders, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(holders, max_norm, foreach=True)
        for chunk, opt in zip(self.chunks, self.opts):
            for i in chunk:
                if not self.accumulated:
                    g = self.params[i].grad
                    self.masters[i].grad = g.float() if g is not None else None
            opt.step()
            for i in chunk:
                self.params[i].copy_(self.masters[i])
                self.masters[i].grad = None
        return norm

    def _step_triton(self, holders, max_norm: float) -> torch.Tensor:
        grads = [h.grad for h in holders]
        norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None], foreach=True)
        scale = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for p, g, w, m, v in zip(self.params, grads, self.masters, self.exp_avg, self.exp_avg_sq):
            if g is None:
                continue
            n, block = p.numel(), 4096
            _adamw_master_kernel[(triton.cdiv(n, block),)](
                p, g, w, m, v, scale, n, self.lr, beta1, beta2, self.eps, self.weight_decay,
                self.lr / bc1, bc2 ** 0.5, BLOCK=block, num_warps=8)
        return norm

    def state_bytes(self) -> int:
        """fp32 masters and moments, and the fp32 accumulators if any."""
        if self.impl == "triton":
            state = [*self.masters, *self.exp_avg, *self.exp_avg_sq]
        else:
            state = [*self.masters] + [v for o in self.opts for s in o.state.values() for v in s.values()
                                       if torch.is_tensor(v) and v.dim() > 0]
        return sum(t.numel() * t.element_size() for t in state)


def check_triton(device, steps: int = 3) -> float:
    """The largest difference between the `triton` and `torch` implementations' fp32 masters after
    `steps` steps on the same bf16 parameters and gradients, relative to the largest update. The
    middle step is clipped, on two micro-batches summed in fp32: clipping bf16 gradients in place,
    as the `torch` implementation does, rounds them to bf16 (about 1e-3 of the update), which the
    `triton` kernel, scaling in fp32, does not."""
    torch.manual_seed(0)
    sizes = [1, 7, 4097, (300, 1000), 70_001]
    base = [torch.randn(s, device=device).to(torch.bfloat16) for s in sizes]
    ps = {k: [torch.nn.Parameter(b.clone()) for b in base] for k in ("triton", "torch")}
    opts = {k: MasterAdamW(ps[k], lr=1e-2, weight_decay=0.1, impl=k) for k in ps}
    start = [m.clone() for m in opts["torch"].masters]
    for step in range(steps):
        clipped = step == 1
        grads = [torch.randn_like(b) * (30 if clipped else 1e-4) for b in base]  # norms ~30k and ~0.06
        for k in ps:
            for _ in range(2 if clipped else 1):
                for p, g in zip(ps[k], grads):
                    p.grad = g.clone()
                if clipped:
                    opts[k].accumulate()
            opts[k].step(1.0)
    update = max(float((m - s).abs().max()) for m, s in zip(opts["torch"].masters, start))
    diff = max(float((a - b).abs().max()) for a, b in zip(opts["triton"].masters, opts["torch"].masters))
    return diff / update
