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

`moments="bf16"` keeps the AdamW moments in bf16, as DeepSeek-V3 trained (fp32 master weights, bf16
moments): 20 bytes per parameter a step instead of 28, and 4 bytes less state. Both implementations
compute the moments in fp32 and round them once per step (torch's AdamW cannot keep bf16 state for
fp32 masters, so the `torch` implementation is written out).

`step(max_norm, overlap=True)` (triton): the global norm is taken on the main stream, and the
updates run on a side stream, group by group in the order that the next forward pass uses them;
`wait(g)` (a forward pre-hook) makes the main stream wait for group g only. The next step's forward
then overlaps with the rest of the update. The arithmetic is the same, so the weights are
bit-identical (`check_triton` checks it). `tune()` picks the kernel's block size on scratch tensors.

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
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp32 or bf16 moments
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # the order of torch's fused AdamW: decoupled decay, moments, bias-corrected step
        w = w - lr * wd * w
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(w_ptr + offs, w, mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)


def _clip_scale(grads, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The global gradient norm and clip_grad_norm_'s coefficient, as tensors (no host sync)."""
    norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None], foreach=True)
    return norm, (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)


class MasterAdamW:
    """fp32 master weights and AdamW moments for bf16 (or any) parameters."""

    def __init__(self, params, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 chunk_elems: int = 1 << 28, impl: str = "auto", moments: str = "fp32"):
        if moments not in ("fp32", "bf16"):
            raise ValueError(f"MasterAdamW moments ({moments!r}) must be 'fp32' or 'bf16'")
        self.moments = moments
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
        self.groups = [list(range(len(self.params)))]  # the update order (set_groups)
        self.side, self.events = None, None  # the overlapped update's stream and per-group events
        self.block, self.num_warps = 4096, 8
        if impl == "triton" or moments == "bf16":
            dtype = torch.bfloat16 if moments == "bf16" else torch.float32
            self.exp_avg = [torch.zeros_like(m, dtype=dtype) for m in self.masters]
            self.exp_avg_sq = [torch.zeros_like(m, dtype=dtype) for m in self.masters]
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

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (a schedule calls this before each step)."""
        self.lr = lr
        for opt in getattr(self, "opts", []):
            for group in opt.param_groups:
                group["lr"] = lr

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

    def set_groups(self, groups) -> None:
        """The parameters in the order the forward pass uses them: a list of lists of parameters.
        Parameters in no group join the first."""
        index = {id(p): i for i, p in enumerate(self.params)}
        order = [[index[id(p)] for p in g if id(p) in index] for g in groups]
        seen = {i for g in order for i in g}
        if len(seen) != sum(len(g) for g in order):
            raise ValueError("MasterAdamW.set_groups: a parameter is in two groups")
        order[0] = [i for i in range(len(self.params)) if i not in seen] + order[0]
        self.groups = order

    def wait(self, group: int) -> None:
        """Make the current stream wait until `group`'s weights are written (after an overlapped step)."""
        if self.events is not None:
            torch.cuda.current_stream().wait_event(self.events[group])

    def finish(self) -> None:
        """Make the current stream wait for the whole overlapped update."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)
        self.events = None

    @torch.no_grad()
    def step(self, max_norm: float, overlap: bool = False) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm`, step, write the weights; returns the norm
        (a tensor: no host sync). With `overlap` (triton), the update runs on a side stream."""
        if overlap and self.impl != "triton":
            raise ValueError(f"MasterAdamW.step: overlap needs impl 'triton', not {self.impl!r}")
        self.steps += 1
        holders = self.masters if self.accumulated else self.params  # whose .grad is the gradient
        if self.impl == "triton":
            norm = self._step_triton(holders, max_norm, overlap)
        elif self.moments == "bf16":
            norm = self._step_torch_bf16_moments(holders, max_norm)
        else:
            norm = self._step_torch(holders, max_norm)
        for t in (*self.params, *self.masters):
            t.grad = None
        self.accumulated = False
        return norm

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

    def _step_torch_bf16_moments(self, holders, max_norm: float) -> torch.Tensor:
        """The triton kernel's arithmetic in torch ops (the reference for bf16 moments, which torch's
        AdamW does not keep): per tensor, the clipped gradient and the moments in fp32, the moments
        stored back in bf16."""
        grads = [h.grad for h in holders]
        norm, scale = _clip_scale(grads, max_norm)
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for p, w, m, v, g in zip(self.params, self.masters, self.exp_avg, self.exp_avg_sq, grads):
            if g is None:
                continue
            g = g.float() * scale
            w.mul_(1 - self.lr * self.weight_decay)
            m32 = m.float().mul_(beta1).add_(g, alpha=1 - beta1)
            v32 = v.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.addcdiv_(m32, v32.sqrt().div_(bc2 ** 0.5).add_(self.eps), value=-self.lr / bc1)
            m.copy_(m32)
            v.copy_(v32)
            p.copy_(w)
        return norm

    def _step_triton(self, holders, max_norm: float, overlap: bool) -> torch.Tensor:
        grads = [h.grad for h in holders]
        # 1. the global norm and the clip coefficient, on the main stream (after the backward)
        norm, scale = _clip_scale(grads, max_norm)
        main = torch.cuda.current_stream()
        if not overlap and self.side is not None:
            self.finish()  # an earlier overlapped update writes the same masters: wait for it
        if overlap:
            # 2. the side stream starts once the gradients and the coefficient exist
            if self.side is None:
                self.side = torch.cuda.Stream(priority=0)  # the lowest priority
            self.side.wait_stream(main)
            scale.record_stream(self.side)  # freed on the host now; its memory waits for the side stream
            self.events = []
        with torch.cuda.stream(self.side if overlap else main):
            for group in self.groups:
                # 3. one kernel per tensor, group by group; an event marks each group's weights written
                for i in group:
                    if grads[i] is not None:
                        if overlap:
                            grads[i].record_stream(self.side)
                        self._launch(i, grads[i], scale)
                if overlap:
                    self.events.append(torch.cuda.Event())
                    self.events[-1].record(self.side)
        return norm

    def _launch(self, i: int, g: torch.Tensor, scale: torch.Tensor) -> None:
        p, w, m, v = self.params[i], self.masters[i], self.exp_avg[i], self.exp_avg_sq[i]
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        n = p.numel()
        _adamw_master_kernel[(triton.cdiv(n, self.block),)](
            p, g, w, m, v, scale, n, self.lr, beta1, beta2, self.eps, self.weight_decay,
            self.lr / bc1, bc2 ** 0.5, BLOCK=self.block, num_warps=self.num_warps)

    def tune(self, numel: int = 1 << 25, iters: int = 10) -> list[dict]:
        """Time the kernel at each (BLOCK, num_warps) on scratch tensors of `numel` elements, keep the
        fastest, and return the table (GB/s at 28 bytes per parameter)."""
        import time

        dev = self.params[0].device
        p = torch.zeros(numel, device=dev, dtype=self.params[0].dtype)
        g, w, m, v = torch.zeros_like(p), *(torch.zeros(numel, device=dev) for _ in range(3))
        scale = torch.ones((), device=dev)
        rows = []
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)):
            launch = lambda: _adamw_master_kernel[(triton.cdiv(numel, block),)](  # noqa: E731
                p, g, w, m, v, scale, numel, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1e-3, 1.0, BLOCK=block, num_warps=warps)
            launch()
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                launch()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = sorted(times)[iters // 2]
            rows.append({"block": block, "num_warps": warps, "ms": t * 1e3, "GB_per_s": 28 * numel / t / 1e9})
        best = max(rows, key=lambda r: r["GB_per_s"])
        self.block, self.num_warps = best["block"], best["num_warps"]
        return rows

    def state_bytes(self) -> int:
        """fp32 masters, the moments (fp32 or bf16), and the fp32 accumulators if any."""
        if self.impl == "triton" or self.moments == "bf16":
            state = [*self.masters, *self.exp_avg, *self.exp_avg_sq]
        else:
            state = [*self.masters] + [v for o in self.opts for s in o.state.values() for v in s.values()
                                       if torch.is_tensor(v) and v.dim() > 0]
        return sum(t.numel() * t.element_size() for t in state)


def check_triton(device, steps: int = 3, moments: str = "fp32") -> float:
    """The largest difference between the `triton` and `torch` implementations' fp32 masters after
    `steps` steps on the same bf16 parameters and gradients, relative to the largest update. The
    middle step is clipped, on two micro-batches summed in fp32: clipping bf16 gradients in place,
    as torch's AdamW path does, rounds them to bf16 (about 1e-3 of the update), which the `triton`
    kernel, scaling in fp32, does not. With bf16 `moments` the two round the same fp32 moments, and
    differ only where fp32 rounding flips a bf16 rounding: a few parts in a thousand of an update."""
    torch.manual_seed(0)
    sizes = [1, 7, 4097, (300, 1000), 70_001]
    base = [torch.randn(s, device=device).to(torch.bfloat16) for s in sizes]
    ps = {k: [torch.nn.Parameter(b.clone()) for b in base] for k in ("triton", "torch", "overlap")}
    opts = {k: MasterAdamW(ps[k], lr=1e-2, weight_decay=0.1, impl=k if k != "overlap" else "triton", moments=moments)
            for k in ps}
    opts["overlap"].set_groups([ps["overlap"][3:], ps["overlap"][:2]])  # the order of use differs
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
            opts[k].step(1.0, overlap=k == "overlap")
            if k == "overlap":  # what the next forward does: wait for each group, in order
                for group in range(len(opts[k].groups)):
                    opts[k].wait(group)
    opts["overlap"].finish()
    for a, b in zip(ps["overlap"], ps["triton"]):  # same arithmetic on another stream: bit-identical
        if not torch.equal(a, b):
            raise RuntimeError("the overlapped triton AdamW differs from the plain one")
    update = max(float((m - s).abs().max()) for m, s in zip(opts["torch"].masters, start))
    diff = max(float((a - b).abs().max()) for a, b in zip(opts["triton"].masters, opts["torch"].masters))
    return diff / update
