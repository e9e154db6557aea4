"""Row-sparse (lazy) optimizer updates for memory value tables.

PKM (Lample et al. 2019) trains its values with sparse Adam; sparse memory finetuning (Lin et al. 2025) updates only
the top-t value rows of a batch. Both need a step that touches ONLY the given rows: every other row of the parameter
and of its optimizer state stays bitwise unchanged, so step time and memory traffic scale with the touched rows, not
with the table. On CUDA the Adam step is one fused Triton pass (``kernels.adam_rows``: gather, update, scatter); on
CPU (fp32) one numba pass over the touched rows in place (``cpu_kernels.adam_rows_``); elsewhere (or without numba)
index_select + torch's fused Adam on the gathered rows + index_copy_ (fp32 on CPU: the moments gathered, the update
computed on a zero buffer and index_add_-ed to the parameter rows, which are never gathered).

- :func:`adam_rows_` / :func:`sgd_rows_`: functional steps on explicit ``(rows, grad_rows)``.
- :class:`RowSparseAdam`: a ``torch.optim.Optimizer`` (param groups, lr schedulers, state_dict) that reads sparse COO
  gradients (``value_lookup(..., sparse=True)``) or dense ones (rows with a non-zero gradient count as touched).
  No weight decay on row-sparse groups (it would move untouched rows). Groups with ``row_sparse=False`` take a plain
  AdamW step (torch's functional AdamW, foreach / fused), so ONE optimizer serves a whole model (pretraining with
  Lightning: dense network + lazily updated value tables).
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as adamw_functional

from memlm.model.memory import cpu_kernels


def _check_rows(param: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
    if rows.dim() != 1 or grad_rows.shape != (rows.numel(), *param.shape[1:]):
        raise ValueError(
            f"rows must be (U,) and grad_rows (U, {', '.join(map(str, param.shape[1:]))}); "
            f"got {tuple(rows.shape)} and {tuple(grad_rows.shape)}"
        )


@torch.no_grad()
def sgd_rows_(param: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor, lr: float) -> None:
    """``param[rows] -= lr * grad_rows`` in place (duplicate rows add up); other rows untouched."""
    _check_rows(param, rows, grad_rows)
    param.index_add_(0, rows, grad_rows.to(param.dtype), alpha=-lr)


ADAM_IMPLS = ("auto", "triton", "torch", "reference")
CPU_CHUNK_ELEMS = 2**20  # elements per gathered (rows, ...) chunk of the CPU Adam step: 4 MB per fp32 tensor


def _bias_corrections(step: int | torch.Tensor, lr: float, beta1: float, beta2: float):
    """(lr / bc1, sqrt(bc2)) of Adam after ``step`` updates: floats, or (U,) fp32 tensors for per-row counts
    (computed in float64, as torch does for the global step)."""
    if isinstance(step, torch.Tensor):
        t = step.to(torch.float64)  # (U,)
        return (lr / (1 - beta1**t)).float(), (1 - beta2**t).sqrt().float()
    return lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


@torch.no_grad()
def adam_rows_(
    param: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    impl: str = "auto",
) -> None:
    """One lazy Adam step on ``param[rows]`` (rows UNIQUE), updating the rows' moments in place.

    Args:
        param: (N, ...) parameter (fp32 or bf16; math in fp32).
        rows: (U,) int64 unique row ids.
        grad_rows: (U, ...) gradient of those rows.
        exp_avg, exp_avg_sq: (N, ...) fp32 moment buffers.
        step: the step number AFTER this update: an int (global count, as torch SparseAdam) or an (U,) tensor of
            per-row counts (bias correction per row).
        impl: "triton" (one fused gather-update-scatter pass; CUDA), "torch" (gather, torch's fused Adam kernel on
            the gathered rows, scatter; global step only, else as "reference"), "reference" (the formula op by op),
            "auto" (triton where it runs; on CPU fp32 the numba pass of ``cpu_kernels.adam_rows_``; else torch).
    Same formula as ``torch.optim.Adam`` (no weight decay, no amsgrad) restricted to the rows.
    """
    _check_rows(param, rows, grad_rows)
    if impl not in ADAM_IMPLS:
        raise ValueError(f"adam_rows_: impl must be one of {ADAM_IMPLS}, got {impl!r}")
    if isinstance(step, torch.Tensor) and step.shape != rows.shape:
        raise ValueError(f"adam_rows_: per-row step counts must be shaped like rows {tuple(rows.shape)}, "
                         f"got {tuple(step.shape)}; pass an int for a global step")  # fmt: skip
    beta1, beta2 = betas
    if impl in ("auto", "triton"):
        from memlm.model.memory import kernels

        fusable = (
            kernels.adam_rows_available(param)
            and all(s.is_contiguous() and s.dtype == torch.float32 for s in (exp_avg, exp_avg_sq))
        )  # fmt: skip
        if fusable:
            step_size, bc2_sqrt = _bias_corrections(step, lr, beta1, beta2)
            kernels.fused_adam_rows(param, rows, grad_rows, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2, eps)
            return
        if impl == "triton":
            raise RuntimeError(
                "adam_rows_(impl='triton') needs Triton, a contiguous float CUDA parameter and contiguous fp32 states"
            )
    if impl == "auto" and cpu_kernels.available(param, grad_rows) and param.dtype == torch.float32 and all(
        s.is_contiguous() and s.dtype == torch.float32 for s in (param, exp_avg, exp_avg_sq)
    ):  # fp32 on CPU: one pass over the touched rows in place (numba), global or per-row steps
        step_size, bc2_sqrt = _bias_corrections(step, lr, beta1, beta2)
        cpu_kernels.adam_rows_(param, rows, grad_rows, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2, eps)
        return
    fused = impl != "reference" and not isinstance(step, torch.Tensor)
    # CPU: chunks of ~4 MB per gathered tensor stay in cache and reuse the allocator's blocks (fresh (U, D)
    # temporaries of a large step cost more in page faults than the update itself); one chunk elsewhere
    n_chunk = rows.numel()
    if param.device.type == "cpu" and impl != "reference":
        n_chunk = max(1, CPU_CHUNK_ELEMS // max(1, param[0].numel()))
    for a in range(0, rows.numel(), n_chunk):
        t = step[a : a + n_chunk] if isinstance(step, torch.Tensor) else step
        _adam_gathered_(param, rows[a : a + n_chunk], grad_rows[a : a + n_chunk], exp_avg, exp_avg_sq, t, lr, betas,
                        eps, fused)  # fmt: skip


def _adam_gathered_(param, rows, grad_rows, exp_avg, exp_avg_sq, step, lr, betas, eps, fused: bool) -> None:
    """Gather the rows of ``param`` and its moments, update them, scatter them back (see :func:`adam_rows_`)."""
    beta1, beta2 = betas
    g = grad_rows.to(torch.float32)  # (U, ...)
    m = exp_avg.index_select(0, rows)  # (U, ...)
    v = exp_avg_sq.index_select(0, rows)  # (U, ...)
    if fused and param.dtype == torch.float32 and param.device.type == "cpu":
        # fp32 on CPU: the fused step on a zero "parameter" yields the update itself, added to the rows in place.
        # That skips gathering the parameter, and index_add_ outpaces index_copy_ on CPU. (Not for bf16: adding a
        # rounded update to a bf16 row would round twice and drop updates below its ulp.)
        delta = torch.zeros_like(g)  # (U, ...)
        t = torch.full((), float(step), device=g.device)
        torch._fused_adam_(
            [delta], [g], [m], [v], [], [t], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        param.index_add_(0, rows, delta)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        return
    p = param.index_select(0, rows).to(torch.float32)  # (U, ...) a copy even for fp32 params
    if fused:  # torch's fused Adam (CPU / CUDA): one pass over the gathered rows instead of ~9 elementwise ops
        t = torch.full((), float(step), device=p.device)  # a fill, not a host copy (which would sync a GPU)
        torch._fused_adam_(
            [p], [g], [m], [v], [], [t], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False,
            maximize=False,
        )  # fmt: skip
    else:
        step_size, bc2_sqrt = _bias_corrections(step, lr, beta1, beta2)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if isinstance(step, torch.Tensor):
            shape = (-1, *([1] * (param.dim() - 1)))  # (U, 1, ...)
            p.sub_(step_size.view(shape) * m / (v.sqrt() / bc2_sqrt.view(shape)).add_(eps))
        else:
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
    param.index_copy_(0, rows, p.to(param.dtype))
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)


def coalesce_rows(rows: torch.Tensor, grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum gradients of duplicate rows: -> (sorted unique rows (U,), summed grads (U, ...))."""
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)  # (U,), (R,)
    out = torch.zeros(uniq.numel(), *grad_rows.shape[1:], device=grad_rows.device, dtype=grad_rows.dtype)
    out.index_add_(0, inverse, grad_rows)  # (U, ...)
    return uniq, out


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A sparse COO row gradient, coalesced, without the sort and copy when its rows are already sorted unique.

    The lookups build their table gradients coalesced (sorted unique rows), but autograd stores a gradient it
    steals into ``.grad`` without that flag, so ``.coalesce()`` would sort and copy it again every step. A COO
    tensor whose 1-D row indices strictly increase is coalesced by definition: checking that is O(rows), and the
    tensor is re-flagged sharing its indices and values. Gradients summed from several backward contributions
    (a shared table read by several layers, accumulation) do have duplicate rows and are coalesced for real."""
    if not grad.is_sparse or grad.is_coalesced():
        return grad
    idx = grad._indices()
    if idx.shape[0] == 1 and (idx.shape[1] < 2 or bool((idx[0, 1:] > idx[0, :-1]).all())):
        return torch.sparse_coo_tensor(idx, grad._values(), grad.shape, is_coalesced=True, check_invariants=False)
    return grad.coalesce()


def grad_to_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A parameter gradient as (unique rows, grad rows): sparse COO -> its rows; dense -> rows with a non-zero."""
    if grad.is_sparse:
        grad = coalesced(grad)
        return grad.indices()[0], grad.values()  # (U,), (U, ...)
    touched = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)  # (U,)
    return touched, grad.index_select(0, touched)


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam: each step updates only the rows present in the gradient; all other rows and state stay bitwise.

    Groups with ``row_sparse=False`` (e.g. the dense network of an LM) instead take a standard AdamW step with their
    ``weight_decay`` (exactly ``torch.optim.AdamW``: same functional update, same state), so one optimizer can hold a
    whole model: dense AdamW + lazy row-sparse Adam for the memory values.

    Args:
        params: parameters or param groups. Row-sparse groups need a leading row dimension (value tables).
        lr, betas, eps: as in Adam.
        weight_decay: decoupled (AdamW) weight decay; allowed only on ``row_sparse=False`` groups.
        per_row_step: bias-correct each row with its own update count (a row first touched late gets the same
            first step as at step 1); False (default) uses the global step count like ``torch.optim.SparseAdam``.
        row_sparse: the default for groups that do not set it (True: every group is lazy, the SMF use).
        fused: dense groups only: torch's fused AdamW kernel; None -> when all of a group's params are on CUDA.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        per_row_step: bool = False,
        weight_decay: float = 0.0,
        row_sparse: bool = True,
        fused: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(
                f"invalid RowSparseAdam hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}"
            )
        defaults = dict(
            lr=lr, betas=betas, eps=eps, per_row_step=per_row_step, weight_decay=weight_decay, row_sparse=row_sparse,
            fused=fused,
        )  # fmt: skip
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            if group["row_sparse"] and group["weight_decay"] != 0:
                name = group.get("name", i)
                raise ValueError(f"RowSparseAdam: group {name!r} is row-sparse; weight decay would move untouched rows")
            if group["row_sparse"]:
                group["fused"] = False  # load_state_dict places "step" by this flag (an int or per-row counts here)
            elif group["fused"] is None:
                group["fused"] = all(p.is_cuda and p.is_floating_point() for p in group["params"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before dense groups existed
            group.setdefault("weight_decay", 0.0)
            group.setdefault("row_sparse", True)
            group.setdefault("fused", False)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, which casts every state tensor to its parameter's dtype. The
        row-sparse groups' moments are fp32 whatever the table's dtype (bf16 tables): they are restored exactly,
        from the saved fp32 tensors, not from that lossy cast."""
        moments = {pid: {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
                   for pid, st in state_dict["state"].items()}  # fmt: skip
        super().load_state_dict(state_dict)
        for saved, group in zip(state_dict["param_groups"], self.param_groups):  # torch maps ids in this order
            if group["row_sparse"]:
                for pid, p in zip(saved["params"], group["params"]):
                    for key, v in moments.get(pid, {}).items():
                        self.state[p][key] = v.to(device=p.device, dtype=torch.float32)

    def _state(self, param: torch.Tensor, per_row_step: bool) -> dict:
        st = self.state[param]
        if not st:
            st["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            st["step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device) if per_row_step else 0
        elif per_row_step and st["step"].device != param.device:  # e.g. loaded from a checkpoint on another device
            st["step"] = st["step"].to(param.device)
        return st

    def _find_group(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("step_rows: the parameter is not managed by this optimizer")

    @torch.no_grad()
    def step_rows(self, param: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Update ``param[rows]`` (rows unique) with ``grad_rows`` using its group's lr/betas/eps."""
        group = self._find_group(param)
        self._step_rows(param, group, rows, grad_rows)

    def _step_rows(self, param: torch.Tensor, group: dict, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        if not group["row_sparse"]:
            raise ValueError("step_rows: the parameter is in a dense (row_sparse=False) group")
        st = self._state(param, group["per_row_step"])
        if group["per_row_step"]:
            t = st["step"].index_select(0, rows) + 1  # (U,)
            st["step"].index_copy_(0, rows, t)
        else:
            st["step"] += 1
            t = st["step"]
        adam_rows_(
            param, rows, grad_rows, st["exp_avg"], st["exp_avg_sq"], t, group["lr"], group["betas"], group["eps"]
        )

    def _dense_step(self, group: dict) -> None:
        """torch.optim.AdamW's update (functional, foreach or fused) on the group's params that have a gradient."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"RowSparseAdam: a parameter of shape {tuple(p.shape)} in dense group {group.get('name')!r} got "
                    "a sparse gradient; put it in a row_sparse group"
                )
            st = self.state[p]
            if not st:  # the same state layout as torch.optim.AdamW
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            fused=True if group["fused"] else None,  # None: torch picks foreach / single-tensor
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter that has a gradient: row-sparse groups touch only their gradient's rows."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["row_sparse"]:
                self._dense_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad_rows = grad_to_rows(p.grad)  # (U,), (U, ...)
                self._step_rows(p, group, rows, grad_rows)
        return loss
