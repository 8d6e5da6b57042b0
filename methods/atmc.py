"""ATMC: adversarially trained model compression (pruning, optional low-rank factorisation, quantisation).

Gui et al., "Model Compression with Adversarial Robustness: A Unified Optimization Framework", NeurIPS 2019;
reference code VITA-Group/ATMC (``cifar/train_proj_admm_quant.py``, ``cifar/util_trts.py``,
``cifar/util_unnormalize.py``, ``utee/pruning_tools.py``, ``utee/quantize.py``, ``super_module/super_class.py``).

Everything is adversarial training ``0.5·CE(f(x), y) + 0.5·CE(f(x'), y)`` with x' a PGD point, under a
compression constraint. Starting from a dense PGD-AT model (the code's ``--raw_train`` stage), this adapter runs:

1. **Sparse stage** (``--prune_algo l0proj``): projected SGD. After every optimiser step (``prune_interval = 1``)
   and once more at the end of every epoch, ``l0proj`` keeps the ``n_keep = int(κ·N)`` largest-magnitude entries
   over *all* Conv2d/Linear weights together (first conv and classifier included) and zeroes the rest
   (:func:`methods.common.project_global`). The mask is dynamic: a pruned weight can come back.
2. **Factorised stage** (``--abc_special``; off unless ``factorize=True``, as the flag is off in the code): every
   layer becomes the code's ``Conv2dsp_v2`` / ``Linearsp_v2`` with rank = min(in·k·k, out) (``get_ranks``):
   A is rank × in × kh × kw (rank × in for a linear layer), B is out × rank × 1 × 1 (out × rank), C has the
   weight's shape, and on the flat views A (rank × in·k·k) and B (out × rank) the weight is
   ``W = B·(A + I) + C`` when rank = in·k·k, else (rank = out) ``W = (B + I)·A + C``. As in ``raw_weights``, the
   dense (already sparse) weight goes into B in the first case and into A in the second, the other factors start
   at zero, so the function is unchanged (:func:`reconstruct_weight`). The same global l0 projection
   then runs jointly over {A, B, C} with the budget of the dense weight count. Products of sparse factors fill
   in, so at the end of the stage the reconstructed W is projected once more onto ``int(κ·N)`` nonzeros
   (a deviation: the code counts nnz(A)+nnz(B)+nnz(C) and never re-projects W; without it the harness's
   canonical sparsity would miss the target).
3. **Quantisation stage** (``--quantize_algo kmeans_nnz_fixed_0_center``): ADMM with a quantised copy Z and a
   scaled dual U. The loss adds ``ρ/2·Σ‖W − Z + U‖²`` (ρ = 0.1, hard-coded in the code); every
   ``quant_interval`` batches ``Z ← quantize(W + U)`` on the nonzero pattern of W, then ``U ← U + W − Z``; the l0
   projection of W continues after every step. The quantiser (:func:`kmeans_quantize`) is a per-tensor 1-D
   k-means with 2^bits centres for the surviving entries plus a fixed zero centre for the pruned ones, so each
   layer has at most 2^bits + 1 distinct values, 0 among them, and the zero pattern (hence the exact count) is
   kept. The returned model is the quantised Z of the final W (the code's ``quant_`` checkpoint); there is no
   separate centroid fine-tuning in the code (the ADMM stage is its fine-tuning), so none is done here.
   ``bits=None`` skips the stage (the paper's "ATMC-32bit").

Differences from the released code, each deliberate:

- The attack starts at x (``random_start=False``) because the code's uniform start is a no-op
  (``x_adv.data.add(...)`` is not in place); ``random_start=True`` gives the intended start. It runs in eval mode
  (:func:`bench.attacks.utils.eval_mode`); the outer forward passes run in train mode.
- Ties in the global top-k are broken by position (exact counts, reproducible masks).
- The k-means starts from ``bits``-spaced points between the smallest and largest surviving value and runs at
  most ``kmeans_iters`` Lloyd iterations (the code's limit is 20); assignment is restricted to the nonzero
  centres for surviving entries, so no surviving weight snaps to zero.
- No model selection on the test set (the code keeps the best adversarial *test* accuracy or the Z closest to
  W); the last epoch is returned. The mixed-bit knapsack (``model_size_*``) and the pure low-rank baseline
  (``--lr_special``) are not offered.

Checkpoints (``bench evaluate --format atmc``, :func:`convert_atmc_checkpoint`): the code saves the bare model's
``state_dict()``. Dense files (``--raw_train``, the l0proj stage) load as they are; factor-form files
(``--abc_special``, ``cifar/resnet/resnet_abcv2.py``) hold per layer ``weightA`` (rank × in × kh × kw),
``weightB`` (out × rank × 1 × 1), ``weightC`` (out × in × kh × kw) and the ``eye_const`` identity (rank × rank),
the linear layer the same with 2-D factors, and each layer's weight is rebuilt as the forward above computes it.
Factor shapes the code never writes are refused rather than guessed at.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bench.attacks.utils import eval_mode
from bench.models import unwrap
from bench.sparsity import measure_sparsity
from bench.training import pgd_linf
from methods.base import MethodCard, PruneData, PruneResult, PruningMethod, config_dict, register_method
from methods.common import global_masks, prunable_layers

__all__ = [
    "ATMC",
    "atmc_loss",
    "check_factor_layout",
    "convert_atmc_checkpoint",
    "kmeans_quantize",
    "l0_project",
    "reconstruct_weight",
]

_FACTOR_SUFFIXES = ("weightA", "weightB", "weightC", "eye_const")


def atmc_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    clean_weight: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """ATMC's training loss ``w·CE(f(x), y) + (1 − w)·CE(f(x'), y)`` (w = 0.5), with x' from L∞ PGD in eval mode.

    Returns:
        ``(loss, clean_ce, adv_ce)``; x' satisfies ‖x' − x‖∞ ≤ ε and x' ∈ [0, 1].
    """
    with eval_mode(model):
        x_adv = pgd_linf(model, x, y, eps=eps, steps=steps, step_size=step_size, random_start=random_start)
    clean = F.cross_entropy(model(x), y)
    adv = F.cross_entropy(model(x_adv), y)
    return clean_weight * clean + (1.0 - clean_weight) * adv, clean, adv


@torch.no_grad()
def l0_project(params: Mapping[str, Tensor], n_keep: int) -> dict[str, Tensor]:
    """In place: keep the ``n_keep`` largest |entries| over all ``params`` together; returns the keep-masks."""
    masks = global_masks(params, n_keep)
    for name, p in params.items():
        p.masked_fill_(~masks[name], 0.0)
    return masks


@torch.no_grad()
def kmeans_quantize(w: Tensor, bits: int, *, iters: int = 20, support: Tensor | None = None) -> Tensor:
    """Per-tensor 1-D k-means with a fixed zero centre (the code's ``kmeans_nnz_fixed_0_center``).

    Entries outside ``support`` (default: the nonzero entries of ``w``) become exactly 0; those inside are
    clustered into at most ``2**bits`` centres by Lloyd iterations from evenly spaced initial centres between
    their minimum and maximum, and replaced by their centre. A centre that lands exactly on 0 is nudged to the
    smallest positive float so that the zero pattern is kept exactly.

    Returns:
        A new tensor with at most ``2**bits + 1`` distinct values (0 included when anything is pruned).
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    support = (w != 0) if support is None else support.to(torch.bool)
    out = torch.zeros_like(w)
    v = w[support].to(torch.float64)
    if v.numel() == 0:
        return out
    k = min(2**bits, v.numel())
    centres = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64, device=v.device)
    assign = None
    for _ in range(max(iters, 1)):
        centres, _ = torch.sort(centres)
        new_assign = torch.bucketize(v, (centres[1:] + centres[:-1]) / 2)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros(k, dtype=torch.float64, device=v.device).scatter_add_(0, assign, v)
        counts = torch.bincount(assign, minlength=k).to(torch.float64)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    values = centres[assign].to(w.dtype)
    tiny = torch.finfo(w.dtype).tiny
    values = torch.where(values == 0, torch.full_like(values, tiny), values)
    out[support] = values
    return out


def reconstruct_weight(a: Tensor, b: Tensor, c: Tensor, eye: Tensor | None = None, *, layer: str = "layer") -> Tensor:
    """The dense weight of one ``Conv2dsp_v2`` / ``Linearsp_v2`` layer, computed as the code's forward does.

    On the flat views A (rank × in·k·k) and B (out × rank): ``B·(A + I) + C`` when rank = in·k·k (in for a
    linear layer), else ``(B + I)·A + C``. The identity is rank × rank and rank = min(in·k·k, out), so it is never
    larger than A (first case) or B (second case), and nothing larger than the weight is built.

    Args:
        a, b, c: ``weightA`` (rank × in × kh × kw, or rank × in), ``weightB`` (out × rank × 1 × 1, or out × rank)
            and ``weightC`` (the weight's shape), as :func:`check_factor_layout` accepts them.
        eye: the layer's stored ``eye_const`` (rank × rank; the code's forward adds this buffer); the identity when
            None.
        layer: the layer's name, for error messages.

    Returns:
        A tensor of ``c``'s shape.
    """
    rank, fan_in, out = check_factor_layout(layer, a, b, c, eye)
    if eye is None:
        eye = torch.eye(rank, dtype=a.dtype, device=a.device)
    flat_a, flat_b = a.reshape(rank, fan_in), b.reshape(out, rank)
    flat = flat_b @ (flat_a + eye) if rank == fan_in else (flat_b + eye) @ flat_a
    return flat.reshape(c.shape) + c


_LAYOUT = (
    "VITA-Group/ATMC writes Conv2dsp_v2 factors as weightA rank×in×kh×kw, weightB out×rank×1×1, weightC "
    "out×in×kh×kw and Linearsp_v2 factors as rank×in, out×rank, out×in, with rank = min(in·kh·kw, out)"
)


def check_factor_layout(layer: str, a: Tensor, b: Tensor, c: Tensor, eye: Tensor | None = None) -> tuple[int, int, int]:
    """Check that ``(weightA, weightB, weightC[, eye_const])`` is a layout the authors' code writes.

    Returns:
        ``(rank, fan_in, out)`` with fan_in = in·kh·kw (in for a linear layer).

    Raises:
        ValueError: one line naming the layer, the shapes found and the layout expected, for any other shapes
            (e.g. conv factors flattened to two dimensions), a rank other than min(in·k·k, out) (the code's
            forward is undefined for it) or an ``eye_const`` that is not rank × rank.
    """
    shapes = f"weightA {tuple(a.shape)}, weightB {tuple(b.shape)}, weightC {tuple(c.shape)}"
    if c.dim() == 4:
        layout_ok = a.dim() == 4 and b.dim() == 4 and tuple(b.shape[1:]) == (a.shape[0], 1, 1)
    elif c.dim() == 2:
        layout_ok = a.dim() == 2 and b.dim() == 2 and b.shape[1] == a.shape[0]
    else:
        layout_ok = False
    if not layout_ok or tuple(c.shape) != (b.shape[0], *a.shape[1:]):
        raise ValueError(
            f"ATMC layer {layer!r} has {shapes}, not the authors' factor layout: {_LAYOUT}; "
            "convert a file saved from those modules' state_dict()"
        )
    rank, out = a.shape[0], b.shape[0]
    fan_in = math.prod(a.shape[1:])
    if rank != min(fan_in, out):
        raise ValueError(
            f"ATMC layer {layer!r} has rank {rank} ({shapes}), but the authors' forward is defined only for "
            f"rank = min(in·k·k, out) = {min(fan_in, out)}; this file was not written by Conv2dsp_v2/Linearsp_v2"
        )
    if eye is not None and tuple(eye.shape) != (rank, rank):
        raise ValueError(
            f"ATMC layer {layer!r} has eye_const of shape {tuple(eye.shape)}, expected the {rank}×{rank} identity "
            f"buffer of a rank-{rank} Conv2dsp_v2/Linearsp_v2 layer"
        )
    return rank, fan_in, out


class _Factorised(nn.Module):
    """``model`` with the listed layers' weights given by ATMC factors {A, B, C} (functional re-parameterisation).

    The factors have the shapes of the code's ``Conv2dsp_v2`` / ``Linearsp_v2`` parameters and start as its
    ``raw_weights`` does, so :meth:`factor_state_dict` is what the code's factor model would save.
    """

    def __init__(self, model: nn.Module, prefix: str, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.model = model
        self.names = [name for name, _ in layers]
        self.keys = [f"{prefix}{name}.weight" for name in self.names]
        self.A, self.B, self.C = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.eyes: list[Tensor] = []
        for _, module in layers:
            w = module.weight.detach()
            out, fan_in = w.shape[0], w[0].numel()
            rank = min(out, fan_in)
            tail = (1, 1) if w.dim() == 4 else ()
            a = torch.zeros(rank, *w.shape[1:], dtype=w.dtype, device=w.device)
            b = torch.zeros(out, rank, *tail, dtype=w.dtype, device=w.device)
            if rank == fan_in:  # W = B·(A + I) + C, B = W (the code's precedence when fan_in = out too)
                b.view(out, rank).copy_(w.reshape(out, fan_in))
            else:  # W = (B + I)·A + C, A = W
                a.view(rank, fan_in).copy_(w.reshape(out, fan_in))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(b))
            self.C.append(nn.Parameter(torch.zeros_like(w)))
            self.eyes.append(torch.eye(rank, dtype=w.dtype, device=w.device))

    def factors(self) -> dict[str, Tensor]:
        out = {}
        for i, key in enumerate(self.keys):
            out[f"{key}A"], out[f"{key}B"], out[f"{key}C"] = self.A[i], self.B[i], self.C[i]
        return out

    def factor_state_dict(self) -> dict[str, Tensor]:
        """The factor layers' entries of the code's ``state_dict()``: ``<layer>.weightA/B/C`` and ``eye_const``."""
        out = {}
        for i, name in enumerate(self.names):
            for suffix, t in zip(_FACTOR_SUFFIXES, (self.A[i], self.B[i], self.C[i], self.eyes[i]), strict=True):
                out[f"{name}.{suffix}"] = t.detach().clone()
        return out

    def weights(self) -> dict[str, Tensor]:
        return {
            key: reconstruct_weight(self.A[i], self.B[i], self.C[i], self.eyes[i], layer=key)
            for i, key in enumerate(self.keys)
        }

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.weights(), (x,))


@register_method("atmc")
class ATMC(PruningMethod):
    """ATMC (Gui et al., NeurIPS 2019): global l0-projected adversarial training, then k-means quantisation by ADMM."""

    card = MethodCard(
        key="atmc",
        display_name="ATMC",
        ap_key="ATMC_Gui2019Model",
        paper_title="Model Compression with Adversarial Robustness: A Unified Optimization Framework",
        paper_url="https://arxiv.org/abs/1902.03538",
        venue="NeurIPS",
        year=2019,
        pipeline="A",
        training={
            "pretraining": "AT-PGD",
            "finetuning": "AT-PGD (0.5 clean + 0.5 PGD CE) + l0 projection",
            "1S/IT": "1S",
        },
        structure="US",
        scope="global",
        criterion="SOLWM",
        losses=("0.5 CE + 0.5 PGD-CE", "l0 projection", "ADMM k-means quantisation"),
        native_sparsity="prune_ratio = fraction of weights KEPT, global over all weight tensors with dim > 1",
    )

    @dataclass(frozen=True)
    class Config:
        """The released CIFAR-10 schedule (``train_proj_admm_quant.py`` defaults and the README's stages).

        Attributes:
            sparse_epochs, sparse_lr, sparse_milestones: l0-projection stage (200 epochs, lr 0.01, ×``lr_gamma``
                at 30/60/90/120).
            factorize: run the factorised stage, ``W = B(A + I) + C`` or ``(B + I)A + C`` (``--abc_special``, off
                by default).
            factor_epochs, factor_lr, factor_milestones: that stage (200 epochs, lr 0.005, decays at 60/80/120).
            bits: quantisation bits per surviving weight (``--quantize_bits``: 8); None skips quantisation.
            quant_epochs, quant_lr, quant_milestones: quantisation stage (150 epochs; lr 0.005 and decays at
                60/80/120 as in the factorised stage, an assumption: the spec gives no separate schedule).
            quant_interval: batches between Z/U updates (``--quant_interval``: 5).
            rho: ADMM penalty (0.1, hard-coded in the code).
            kmeans_iters: Lloyd iterations at most (20).
            lr_gamma: learning-rate drop factor (0.1).
            momentum, weight_decay: SGD's (0.9, ``--wd`` 1e-4).
            batch_size: 128.
            pgd_steps: ``--defend_iter`` (7).
            pgd_step_ratio: PGD step as a fraction of eps·(1/steps): the code's step is 1.25·ε/steps.
            random_start: uniform PGD start (the code's is a no-op, so False reproduces it).
            clean_weight: weight of the clean CE (0.5; the PGD CE gets 1 − it).
        """

        sparse_epochs: int = 200
        sparse_lr: float = 0.01
        sparse_milestones: tuple[int, ...] = (30, 60, 90, 120)
        factorize: bool = False
        factor_epochs: int = 200
        factor_lr: float = 0.005
        factor_milestones: tuple[int, ...] = (60, 80, 120)
        bits: int | None = 8
        quant_epochs: int = 150
        quant_lr: float = 0.005
        quant_milestones: tuple[int, ...] = (60, 80, 120)
        quant_interval: int = 5
        rho: float = 0.1
        kmeans_iters: int = 20
        lr_gamma: float = 0.1
        momentum: float = 0.9
        weight_decay: float = 1e-4
        batch_size: int = 128
        pgd_steps: int = 7
        pgd_step_ratio: float = 1.25
        random_start: bool = False
        clean_weight: float = 0.5

    def digits_config(self, **overrides):
        """CPU-sized schedule of the digits track (small_cnn, eps 0.2): 3 sparse + 2 quantisation epochs.

        Batch 64, PGD-5 (step 1.25·ε/5), lr ×0.1 for the last sparse epoch, Z/U updates every 5 batches, 8 bits,
        no factorised stage (as the code's default). Measured on the 1,437 digits training images with small_cnn,
        one thread of a shared 2-core CPU: about 10 s for the whole run.
        """
        defaults = {
            "sparse_epochs": 3,
            "sparse_milestones": (2,),
            "factor_epochs": 2,
            "factor_milestones": (),
            "quant_epochs": 2,
            "quant_milestones": (),
            "batch_size": 64,
            "pgd_steps": 5,
        }
        return self.config(**{**defaults, **overrides})

    def prune(
        self, model: nn.Module, sparsity: float, data: PruneData, config: Config, *, seed: int = 0
    ) -> PruneResult:
        """Compress ``model`` to ``int((1 − sparsity)·N)`` nonzero weights over all Conv2d/Linear layers.

        Args:
            model: the dense PGD-adversarially-trained network (left unchanged).
            sparsity: canonical target; ATMC's kept fraction is ``1 − sparsity``.
            data: training images in [0, 1], labels and the L∞ eps of the training attack.
            config: an :class:`ATMC.Config`.
            seed: seeds the batch order and (with ``random_start``) the PGD starts.

        Returns:
            A deep copy of ``model`` with the same state-dict keys, exactly ``int(kept·N)`` nonzero weights,
            at most 2^bits + 1 distinct values per layer, and ``native_sparsity`` = {"prune_ratio", "bits", ...}.
        """
        self.check_sparsity(sparsity)
        _check_config(config)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        work = copy.deepcopy(model)
        net = unwrap(work)
        prefix = "net." if net is not work else ""
        layers = prunable_layers(net)
        kept = round(1.0 - sparsity, 12)
        total = sum(m.weight.numel() for _, m in layers)
        n_keep = int(kept * total)
        step_size = config.pgd_step_ratio * data.eps / max(config.pgd_steps, 1)
        weights = {name: m.weight for name, m in layers}
        history: list[dict] = []

        def train(module, params, project, epochs, lr0, milestones, phase, admm=None):
            opt = torch.optim.SGD(params, lr=lr0, momentum=config.momentum, weight_decay=config.weight_decay)
            for epoch in range(epochs):
                lr = lr0 * config.lr_gamma ** sum(epoch >= m for m in milestones)
                history.append(
                    _epoch(module, data, config, gen, opt, lr=lr, step_size=step_size, project=project, admm=admm)
                    | {"phase": phase, "epoch": epoch + 1}
                )
                project()

        l0_project(weights, n_keep)
        train(
            work,
            work.parameters(),
            lambda: l0_project(weights, n_keep),
            config.sparse_epochs,
            config.sparse_lr,
            config.sparse_milestones,
            "sparse",
        )

        if config.factorize:
            fact = _Factorised(work, prefix, layers)
            factors = fact.factors()
            weight_ids = {id(w) for w in weights.values()}
            params = [*fact.A, *fact.B, *fact.C, *(p for p in work.parameters() if id(p) not in weight_ids)]
            train(
                fact,
                params,
                lambda: l0_project(factors, n_keep),
                config.factor_epochs,
                config.factor_lr,
                config.factor_milestones,
                "factorised",
            )
            with torch.no_grad():
                for (_, module), w in zip(layers, fact.weights().values(), strict=True):
                    module.weight.copy_(w)
            l0_project(weights, n_keep)

        if config.bits is not None:
            admm = _QuantADMM(weights, config)
            train(
                work,
                work.parameters(),
                lambda: l0_project(weights, n_keep),
                config.quant_epochs,
                config.quant_lr,
                config.quant_milestones,
                "quantise",
                admm=admm,
            )
            admm.update()  # Z of the final W (the code's quant_ model)
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(admm.Z[name])

        work.eval()
        report = measure_sparsity(work)
        native = {
            "prune_ratio": kept,
            "bits": config.bits,
            "n_keep": n_keep,
            "weights_counted": total,
            "factorize": config.factorize,
            "canonical_sparsity": report.sparsity,
        }
        return PruneResult(model=work, native_sparsity=native, config=config_dict(config), history=history)


class _QuantADMM:
    """Z (quantised copy) and scaled dual U of ATMC's quantisation stage; Z starts at W, U at 0 (the code's init)."""

    def __init__(self, weights: Mapping[str, Tensor], config: ATMC.Config) -> None:
        self.weights = weights
        self.bits, self.iters = config.bits, config.kmeans_iters
        self.rho, self.interval = config.rho, config.quant_interval
        self.Z = {name: w.detach().clone() for name, w in weights.items()}
        self.U = {name: torch.zeros_like(w) for name, w in weights.items()}
        self.batches = 0

    def penalty(self) -> Tensor:
        return 0.5 * self.rho * sum((w - self.Z[n] + self.U[n]).pow(2).sum() for n, w in self.weights.items())

    @torch.no_grad()
    def update(self) -> None:
        """``Z ← quantize(W + U)`` on W's nonzero pattern, then ``U ← U + W − Z``."""
        for name, w in self.weights.items():
            z = kmeans_quantize(w + self.U[name], self.bits, iters=self.iters, support=w != 0)
            self.Z[name] = z
            self.U[name] = self.U[name] + w - z

    def after_step(self) -> None:
        self.batches += 1
        if self.batches % self.interval == 0:
            self.update()


def _check_config(config: ATMC.Config) -> None:
    if config.bits is not None and not 1 <= config.bits <= 16:
        raise ValueError(f"bits must be in 1..16 or None (no quantisation), got {config.bits}")
    if config.quant_interval < 1:
        raise ValueError(f"quant_interval must be a positive number of batches, got {config.quant_interval}")
    if not 0.0 <= config.clean_weight <= 1.0:
        raise ValueError(f"clean_weight must be in [0, 1], got {config.clean_weight}")


def _epoch(model, data, config, gen, opt, *, lr, step_size, project, admm=None) -> dict:
    """One epoch of 0.5/0.5 clean/PGD training; ``project`` runs after every optimiser step."""
    for group in opt.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    start = time.perf_counter()
    sums = {"loss": 0.0, "clean_ce": 0.0, "adv_ce": 0.0}
    seen = 0
    model.train()
    for xb, yb in data.batches(config.batch_size, gen):
        xb, yb = xb.to(device), yb.to(device)
        loss, clean, adv = atmc_loss(
            model,
            xb,
            yb,
            eps=data.eps,
            steps=config.pgd_steps,
            step_size=step_size,
            random_start=config.random_start,
            clean_weight=config.clean_weight,
        )
        total = loss + admm.penalty() if admm is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        project()
        if admm is not None:
            admm.after_step()
        for key, value in (("loss", loss), ("clean_ce", clean), ("adv_ce", adv)):
            sums[key] += value.item() * len(yb)
        seen += len(yb)
    return {"lr": lr, **{k: v / seen for k, v in sums.items()}, "wall_seconds": time.perf_counter() - start}


def convert_atmc_checkpoint(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """An ATMC checkpoint as a dense state dict (``<layer>.weight``); dense checkpoints pass through.

    ``train_proj_admm_quant.py`` saves the bare model's ``state_dict()`` (``utee/misc.py`` ``model_snapshot``). In
    the factor form (``--abc_special``: ``Conv2dsp_v2`` / ``Linearsp_v2`` layers) every layer stores
    ``<layer>.weightA`` (rank × in × kh × kw; rank × in for a linear layer), ``<layer>.weightB``
    (out × rank × 1 × 1; out × rank), ``<layer>.weightC`` (the weight's shape) and the rank × rank identity buffer
    ``<layer>.eye_const``, with rank = min(in·kh·kw, out); :func:`reconstruct_weight` rebuilds the weight exactly
    as the code's forward does and the factor keys are dropped. Biases, batch-norm entries and layers that are
    not factorised pass through. A DataParallel ``module.`` prefix and a ``{"state_dict": ...}`` container are
    removed; non-tensors are dropped. Quantised files (the ``quant_`` checkpoints) need nothing more: their
    factors are already snapped to the centres.

    Raises:
        ValueError: no tensors; a factor layer without all of weightA, weightB, weightC and eye_const (without
            ``eye_const`` it is not the code's v2 layer, whose forward adds it); factor shapes the code never
            writes (:func:`check_factor_layout`).
    """
    sd: Mapping[str, object] = state_dict
    inner = sd.get("state_dict")
    if isinstance(inner, Mapping):
        sd = inner
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if not tensors:
        raise ValueError("no weight tensors in this ATMC checkpoint")
    out: dict[str, Tensor] = {}
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in _FACTOR_SUFFIXES})
    for layer in layers:
        try:
            a, b, c, eye = (tensors[f"{layer}.{suffix}"] for suffix in _FACTOR_SUFFIXES)
        except KeyError as err:
            raise ValueError(
                f"ATMC layer {layer!r} lacks {err.args[0]!r}: the authors' Conv2dsp_v2/Linearsp_v2 layers save "
                "weightA, weightB, weightC and eye_const; pass the file as the training script saved it"
            ) from None
        with torch.no_grad():
            out[f"{layer}.weight"] = reconstruct_weight(a, b, c, eye, layer=layer)
    for key, value in tensors.items():
        prefix, _, last = key.rpartition(".")
        if last in _FACTOR_SUFFIXES and prefix in layers:
            continue
        out.setdefault(key, value)
    return out
