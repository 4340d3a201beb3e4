"""Least-squares rescaling of the kept blocks after pruning (the "mask tuning" step of Kwon et al. 2022).

For each sublayer in forward order, the kept heads (or neurons) get real-valued mask values ``m`` that make
the pruned sublayer's output projection reproduce the unpruned model's on a sample of tokens:

    minimise  sum_tokens || sum_g m_g C_g + b - T ||^2  +  lambda || m - 1 ||^2

``C_g`` is block ``g``'s contribution (its input channels times its columns of the projection), ``b`` the
bias and ``T`` the unpruned model's projection output for the same example. Inputs come from the pruned model
with the earlier sublayers already rescaled, targets from the unpruned one. The objective is quadratic, so
the exact solution is one small linear solve per sublayer; the ridge term pulls towards the plain pruned
masks, so the reconstruction error never ends above that of ``m = 1``. The values are folded into the
projection's input columns, so the model stays a stock model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...arch import describe
from ...masks import StructuralMasks, apply_masks, remove_masks


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass
class SiteFit:
    """Reconstruction error (sum of squares over the sample's tokens) of one sublayer, before and after."""

    kind: str  # "attention" or "ffn"
    site: int
    before: float
    after: float


def _capture(model: nn.Module, module: nn.Module, batch: dict[str, Tensor], output: bool) -> Tensor:
    """Run ``model`` on ``batch`` until ``module``; return its input (or output), then stop."""
    got: list[Tensor] = []

    def pre(mod, args):
        got.append(args[0].detach())
        raise _Stop

    def post(mod, args, out):
        got.append(out.detach())
        raise _Stop

    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        # an encoder-decoder builds its decoder inputs from the labels; other models need no labels here
        seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        model(**(batch if seq2seq else {k: v for k, v in batch.items() if k != "labels"}))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError("the forward pass never reached the sublayer being rescaled")
    return got[0]


def _tokens(x: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """The rows of ``x`` (batch, length, width) at real (not padding) tokens, as float32: by the attention mask,
    or, for an encoder-decoder's decoder sublayers (whose length is the target's), by the labelled targets."""
    keep = batch.get("attention_mask")
    if keep is not None and keep.shape[:2] != x.shape[:2]:
        labels = batch.get("labels")
        keep = labels != -100 if labels is not None and labels.shape[:2] == x.shape[:2] else None
    rows = x[keep.bool()] if keep is not None else x.reshape(-1, x.shape[-1])
    return rows.float()


def _block_sum(m: Tensor, groups: int) -> Tensor:
    w = m.shape[0] // groups
    return m.view(groups, w, groups, w).sum(dim=(1, 3))


@torch.no_grad()
def _fit_site(
    student: nn.Module,
    teacher: nn.Module,
    proj: nn.Module,
    teacher_proj: nn.Module,
    keep: Tensor,
    batches: Sequence[dict[str, Tensor]],
    damping: float,
) -> tuple[float, float, Tensor]:
    """Fit one sublayer. Pruned blocks contribute nothing, so only the kept blocks' channels enter the sums."""
    groups = len(keep)
    width = proj.weight.shape[1] // groups
    kept = torch.nonzero(keep.cpu()).flatten()
    channels = (kept[:, None] * width + torch.arange(width)).flatten().to(proj.weight.device)
    W = proj.weight.detach()[:, channels].float()
    b = proj.bias.detach().float() if proj.bias is not None else None
    n = len(channels)
    xtx = torch.zeros(n, n, dtype=torch.float64, device=W.device)
    xr = torch.zeros(n, dtype=torch.float64, device=W.device)
    c0 = 0.0
    for batch in batches:
        t = _tokens(_capture(teacher, teacher_proj, batch, output=True), batch)
        x = _tokens(_capture(student, proj, batch, output=False), batch)[:, channels]
        if b is not None:
            t = t - b
        xtx += (x.T @ x).double()  # float32 products, float64 sums
        xr += (x * (t @ W)).sum(dim=0).double()
        c0 += float((t.double() ** 2).sum())
    k = len(kept)
    gram = _block_sum(xtx * (W.T @ W).double(), k).cpu()
    rhs = xr.view(k, width).sum(dim=1).cpu()

    def error(m: Tensor) -> float:
        return float(m @ gram @ m - 2 * m @ rhs) + c0

    ones = torch.ones(k, dtype=torch.float64)
    lam = damping * float(gram.diagonal().mean())
    solved = torch.linalg.solve(gram + lam * torch.eye(k, dtype=torch.float64), rhs + lam)
    m = torch.zeros(groups, dtype=torch.float64)
    m[kept] = solved
    return error(ones), error(solved), m


def rescale_outputs(
    student: nn.Module,
    teacher: nn.Module,
    masks: StructuralMasks,
    batches: Sequence[dict[str, Tensor]],
    damping: float = 1e-3,
) -> list[SiteFit]:
    """Rescale the kept blocks of ``student`` (pruned by ``masks``) towards ``teacher`` (the unpruned model).

    ``student`` and ``teacher`` start as identical copies; ``masks`` are binary. The student's output
    projections are changed in place; the masks are applied only while fitting. Both models run in eval mode.
    Returns the reconstruction error of every fitted sublayer before and after.
    """
    s_struct, t_struct = describe(student), describe(teacher)
    order = sorted(
        [("attention", i, s.layer) for i, s in enumerate(s_struct.attention)]
        + [("ffn", i, s.layer) for i, s in enumerate(s_struct.ffn)],
        key=lambda item: (item[2], item[0] != "attention"),
    )
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    apply_masks(student, masks)
    fits: list[SiteFit] = []
    try:
        for kind, i, _ in order:
            if kind == "attention":
                keep, proj, t_proj = masks.heads[i] == 1, s_struct.attention[i].o, t_struct.attention[i].o
            else:
                keep, proj, t_proj = masks.neurons[i] == 1, s_struct.ffn[i].down, t_struct.ffn[i].down
            if len(keep) == 0 or not bool(keep.any()):
                continue  # the sublayer is skipped altogether
            before, after, m = _fit_site(student, teacher, proj, t_proj, keep, batches, damping)
            width = proj.weight.shape[1] // len(keep)
            scale = m.repeat_interleave(width).to(proj.weight.device, proj.weight.dtype)
            with torch.no_grad():
                proj.weight.mul_(torch.where(scale == 0, torch.ones_like(scale), scale))
            fits.append(SiteFit(kind, i, before, after))
    finally:
        remove_masks(student)
        student.train(modes[0])
        teacher.train(modes[1])
    return fits
