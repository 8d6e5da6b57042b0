"""PwoA: pruning an adversarially robust network without adversarial examples.

Jian, Wang, Wang, Dy, Ioannidis, "Pruning Adversarially Robust Neural Networks without Adversarial Examples",
ICDM 2022 (arXiv 2210.04311); reference code neu-spiral/PwoA (``scripts/cifar10.sh``,
``config/general-prune-hsicbt-cifar10.yaml``, ``source/hsicbt/core/train_hsic_prune.py``,
``source/hsicbt/math/{admm,hsic}.py``).

The dense, adversarially pre-trained model (a third-party TRADES/LBGAT network in the paper) is both the frozen
teacher and the student's initialisation. The student minimises, on *natural* examples only,

    α·T²·KL(teacher ‖ student at temperature T) + λ_x Σ_l nHSIC(Z_l, X) − λ_y Σ_l nHSIC(Z_l, Y)

subject to per-layer sparsity, solved by ADMM (W, Z, U splitting; :class:`methods.common.ADMMState`):

1. **ADMM phase** (50 epochs): SGD on the KD loss (+ HSIC, whose weights are 0 in this phase as shipped: the
   script passes only the retrain weights) + ``Σ_l ρ/2 ‖W_l − Z_l + U_l‖²``. The learning rate follows a 3-epoch
   cycle (lr, lr/10, lr/100: ``admm_adjust_learning_rate``). At the start of every epoch ``Z ← Π(W)`` (the code's
   ``admm_initialization``, U kept); at the start of epochs 4, 7, 10, … (1-based) ρ ← min(1, 1.35ρ), then
   ``Z ← Π(W + U)`` and ``U ← U + W − Z`` (all detached).
2. **Hard prune**: ``W ← Π(W)`` per layer.
3. **Masked retrain** (100 epochs): a fresh SGD optimiser, per-iteration cosine annealing to 4e-8, the same KD
   loss plus HSIC (λ_x = 2e-5, λ_y = 1e-4), no ADMM penalty; pruned weights stay exactly 0.0
   (:func:`methods.common.masked_step`).

No adversarial example is ever generated unless the optional mix variant (``mix_ratio > 0``, the paper's Fig. 3)
is switched on: then each batch is, with probability ``mix_ratio``, replaced by its PGD adversarial examples.

HSIC: the code uses ``hsic_normalized_cca`` (:func:`hsic_normalized`), with Gaussian kernels of width σ = 5
scaled by the feature dimension d (``exp(−‖a−b‖²/(2σ²d))``, the paper's σ = 5√d) for the hidden representation
and the input, and a linear kernel on one-hot labels. The textbook biased estimator (Gretton et al. 2005) is
:func:`hsic_biased`; ``Config.hsic_estimator`` picks one. Hidden representations: the code's models return the
stem output, every residual block's output and the pooled feature. This adapter collects them with forward hooks:
by default on the output of every Conv2d/Linear layer except the last one (the logits); for small_cnn that is
its three convolutions and its hidden linear layer. ``Config.hsic_layers`` names other modules (for ResNets, e.g.
``("conv1", "layer1.0", ..., "layer4.1")`` to follow the code).

Pruned layers (the code's rule): every 4-D weight (every Conv2d, first conv and shortcuts included) plus any
parameter whose name contains ``fc.weight``; so a WRN's ``fc`` is pruned while ResNet-18's ``linear`` is not.
``prune_linear=True`` prunes every Linear layer as well (the digits track does, see :meth:`PwoA.digits_config`).
The canonical target ``s`` is used as the code's ``prune_ratio`` in every pruned layer.

Differences from the released code, each deliberate:

- The projection prunes exactly ``int(p · n)`` entries per layer (ties by position); the code thresholds at a
  numpy percentile, which can differ by one entry and keeps exact ties.
- The retrain mask covers the pruned layers only; the code freezes *every* parameter that is exactly zero after
  hard pruning (BN and biases included), which only matters for parameters that happen to be 0.0.
- HSIC runs on the training device in float32 (the code casts the kernels to CPU FloatTensors).
- No model selection on the test set (the code keeps the retrain epoch with the best PGD *test* accuracy); the
  last epoch is returned.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.attacks.utils import eval_mode
from bench.models import unwrap
from bench.sparsity import measure_sparsity
from bench.training import pgd_linf
from methods.base import MethodCard, PruneData, PruneResult, PruningMethod, config_dict, register_method
from methods.common import ADMMState, masked_step, prunable_layers, sparsity_of_layers

__all__ = [
    "PwoA",
    "admm_cycle_lr",
    "convert_pwoa_checkpoint",
    "gaussian_kernel",
    "hsic_biased",
    "hsic_normalized",
    "kd_loss",
    "pwoa_layers",
]

ESTIMATORS = ("normalized", "biased")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_PREFIXES = ("module.model.", "module.")


# ---------------------------------------------------------------------------------------------------------------
# HSIC estimators (pure functions)
# ---------------------------------------------------------------------------------------------------------------


def gaussian_kernel(x: Tensor, sigma: float) -> Tensor:
    """``K_ij = exp(−‖x_i − x_j‖² / (2σ²d))`` over the rows of ``x`` flattened to (m, d) (HBaR's ``kernelmat``)."""
    x = x.reshape(len(x), -1).float()
    sq = (x * x).sum(1, keepdim=True)
    dist = (sq - 2 * x @ x.T + sq.T).abs()
    return torch.exp(-dist / (2.0 * sigma * sigma * x.shape[1]))


def linear_kernel(x: Tensor) -> Tensor:
    x = x.reshape(len(x), -1).float()
    return x @ x.T


def _kernel(x: Tensor, sigma: float, kind: str) -> Tensor:
    if kind == "gaussian":
        return gaussian_kernel(x, sigma)
    if kind == "linear":
        return linear_kernel(x)
    raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kind!r}")


def _centering(m: int, like: Tensor) -> Tensor:
    return torch.eye(m, dtype=like.dtype, device=like.device) - 1.0 / m


def hsic_biased(x: Tensor, y: Tensor, sigma: float = 5.0, *, kernel_x="gaussian", kernel_y="gaussian") -> Tensor:
    """The textbook biased HSIC estimator (Gretton et al. 2005): ``(m−1)^{-2} tr(K_X H K_Y H)``, ``H = I − 11ᵀ/m``.

    Args:
        x, y: ``m`` samples each (any trailing shape; flattened per sample).
        sigma: Gaussian width, scaled by each variable's dimension as in :func:`gaussian_kernel`.
        kernel_x, kernel_y: ``"gaussian"`` or ``"linear"``.

    Returns:
        A scalar ≥ 0 (for positive semi-definite kernels), symmetric in (x, y), invariant to a permutation applied
        to the samples of both.
    """
    m = len(x)
    kx, ky = _kernel(x, sigma, kernel_x), _kernel(y, sigma, kernel_y)
    h = _centering(m, kx)
    return torch.trace(kx @ h @ ky @ h) / (m - 1) ** 2


def hsic_normalized(
    x: Tensor, y: Tensor, sigma: float = 5.0, *, kernel_x="gaussian", kernel_y="gaussian", epsilon: float = 1e-5
) -> Tensor:
    """The code's normalised HSIC (HBaR/PwoA ``hsic_normalized_cca``): ``tr(R_X R_Y)``.

    With centred kernels ``K̃ = K H`` and ``R = K̃ (K̃ + ε m I)^{-1}``, the score is ``Σ_ij R_X,ij R_Y,ji``. For
    ``x = y`` it approaches the rank of the centred kernel (≈ C − 1 for one-hot labels of C classes with a linear
    kernel).
    """
    m = len(x)
    eye = torch.eye(m, device=x.device)
    rs = []
    for v, kind in ((x, kernel_x), (y, kernel_y)):
        k = _kernel(v, sigma, kind)
        kc = k @ _centering(m, k)
        rs.append(kc @ torch.linalg.inv(kc + epsilon * m * eye))
    return (rs[0] * rs[1].T).sum()


# ---------------------------------------------------------------------------------------------------------------
# Losses and schedules
# ---------------------------------------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, weight: float) -> Tensor:
    """``α·T²·KL(teacher ‖ student)`` at temperature T, as the code computes it: ``nn.KLDivLoss(log_target=True)``
    with the default ``'mean'`` reduction, i.e. the KL summed over classes and samples divided by B·C."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits / t, dim=1)
    # Explicit sum / (B·C): PyTorch's 'mean' reduction, which the code relies on, is slated to change.
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / log_s.numel()
    return weight * t * t * kl


def admm_cycle_lr(epoch: int, lr: float, cycle: int = 3) -> float:
    """The ADMM-phase rate (``admm_adjust_learning_rate``) for 1-based ``epoch``: lr, lr/10, lr/100, … per cycle."""
    return lr * 0.1 ** ((epoch - 1) % cycle)


def pwoa_layers(net: nn.Module, *, prune_linear: bool = False) -> list[str]:
    """The layers PwoA prunes in ``net``: every Conv2d, plus Linear layers whose weight name contains ``fc.weight``
    (or every Linear with ``prune_linear``)."""
    out = []
    for name, mod in prunable_layers(net):
        if isinstance(mod, nn.Conv2d) or prune_linear or "fc.weight" in f"{name}.weight":
            out.append(name)
    return out


@register_method("pwoa")
class PwoA(PruningMethod):
    """PwoA (Jian et al., ICDM 2022): ADMM pruning by self-distillation (T = 30) + HSIC bottleneck, no AEs."""

    card = MethodCard(
        key="pwoa",
        display_name="PwoA",
        ap_key="PwoA_Jian2022Pruning",
        paper_title="Pruning Adversarially Robust Neural Networks without Adversarial Examples",
        paper_url="https://arxiv.org/abs/2210.04311",
        venue="ICDM",
        year=2022,
        pipeline="A",
        training={
            "pretraining": "AT-TRADES (third-party)",
            "finetuning": "KD (+HSIC), no adversarial examples",
            "1S/IT": "1S",
        },
        structure="US",
        scope="local",
        criterion="SOLWM",
        losses=("KD (T=30)", "HSIC bottleneck", "ADMM"),
        native_sparsity="prune_ratio: fraction pruned in every pruned layer",
    )

    @dataclass(frozen=True)
    class Config:
        """The released CIFAR-10 schedule (``scripts/cifar10.sh``, the yaml, the paper's Table IX).

        Attributes:
            admm_epochs: ADMM-phase epochs (50).
            admm_lr: ADMM-phase rate at the start of each cycle (0.01).
            lr_cycle: epochs of the lr cycle and between Z/U updates (the code's ``admm_epochs``: 3).
            rho: initial ρ (0.01). multi_rho: grow it at each Z/U update, by ``rho_growth`` (1.35) up to
                ``rho_cap`` (1.0).
            retrain_epochs: masked-retrain epochs (100). retrain_lr: its initial rate (0.005), cosine-annealed per
                iteration to ``eta_min`` (4e-8).
            momentum, weight_decay, batch_size: SGD's (0.9, 1e-4) and the minibatch (128).
            temperature: KD temperature T (30). kd_weight: α (10 on CIFAR-10). xentropy_weight: weight of a clean
                cross-entropy term (0 in the code).
            lambda_x, lambda_y: HSIC weights of the ADMM phase (0 as shipped: the script sets only the retrain ones).
            retrain_lambda_x, retrain_lambda_y: HSIC weights of the retrain phase (2e-5, 1e-4).
            hsic_sigma: Gaussian kernel width σ (5; scaled by √d). hsic_estimator: ``"normalized"`` (the code's) or
                ``"biased"`` (textbook). hsic_layers: module names whose outputs are the hidden representations
                (empty: every Conv2d/Linear output except the logits).
            mix_ratio: probability that a batch is replaced by PGD adversarial examples (0: PwoA proper).
            mix_eps: the attack's L∞ radius (None: the data's eps; the code uses 8/255); mix_steps (10) and
                mix_step_ratio (step size / eps: 2/255 at 8/255 = 0.25).
            projection: ``"irregular"`` (weights; the code also has column/filter) or ``"filter"``.
            prune_linear: prune every Linear layer too, not only those named ``fc``.
        """

        admm_epochs: int = 50
        admm_lr: float = 0.01
        lr_cycle: int = 3
        rho: float = 0.01
        multi_rho: bool = True
        rho_growth: float = 1.35
        rho_cap: float = 1.0
        retrain_epochs: int = 100
        retrain_lr: float = 0.005
        eta_min: float = 4e-8
        momentum: float = 0.9
        weight_decay: float = 1e-4
        batch_size: int = 128
        temperature: float = 30.0
        kd_weight: float = 10.0
        xentropy_weight: float = 0.0
        lambda_x: float = 0.0
        lambda_y: float = 0.0
        retrain_lambda_x: float = 2e-5
        retrain_lambda_y: float = 1e-4
        hsic_sigma: float = 5.0
        hsic_estimator: str = "normalized"
        hsic_layers: tuple[str, ...] = ()
        mix_ratio: float = 0.0
        mix_eps: float | None = None
        mix_steps: int = 10
        mix_step_ratio: float = 0.25
        projection: str = "irregular"
        prune_linear: bool = False

    def digits_config(self, **overrides):
        """CPU-sized schedule of the digits track (small_cnn): 6 ADMM + 8 retrain epochs, batch 64.

        Two 3-epoch lr cycles (one Z/U update, at epoch 4, ρ ×1.35); retraining cosine-anneals over 8 epochs. The
        KD/HSIC weights, rates and ρ are the code's CIFAR-10 ones. Measured on the 1,437 digits training images,
        one thread of a shared 2-core CPU: 7.5 s with 4 retrain epochs, 11.7 s with these 8 (no PGD; ~0.4 s per
        ADMM epoch, ~1.2 s per retrain epoch, HSIC included). From a dense small CNN at 97.2 % clean accuracy,
        ratio 0.9 keeps 95.0 % (88.1 % with 4 retrain epochs).

        Unlike the code's rule (convolutions plus ``fc``), the digits track prunes every linear layer
        (``prune_linear=True``): small_cnn keeps 70 % of its weights in its two linear layers, so a "0.9" model
        pruned in its convolutions only would be 27 % sparse by the canonical measure (as in RAP-ADMM's adapter).
        """
        defaults = {"admm_epochs": 6, "retrain_epochs": 8, "batch_size": 64, "prune_linear": True}
        return self.config(**{**defaults, **overrides})

    def pruned_layers(self, model: nn.Module, config: Config | None = None) -> list[str]:
        """Bare-architecture names of the pruned layers (see :func:`pwoa_layers`)."""
        config = config or self.config()
        return pwoa_layers(unwrap(model), prune_linear=config.prune_linear)

    def prune(
        self, model: nn.Module, sparsity: float, data: PruneData, config: Config, *, seed: int = 0
    ) -> PruneResult:
        """Prune ``model`` at ratio ``sparsity`` per pruned layer: KD+HSIC ADMM, hard prune, masked KD+HSIC retrain.

        Args:
            model: the dense robust network (left unchanged; a frozen copy is the teacher).
            sparsity: canonical target, used as the per-layer ``prune_ratio``.
            data: natural training images in [0, 1] and labels (``eps`` is used only by the mix variant).
            config: a :class:`PwoA.Config`.
            seed: seeds the batch order (and the mix variant's coin flips and PGD starts).

        Returns:
            The pruned student (same state-dict keys, pruned weights exactly 0.0); ``native_sparsity`` holds
            ``prune_ratio`` and the measured sparsities.
        """
        self.check_sparsity(sparsity)
        _check_config(config)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        coin = random.Random(seed)
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        work = copy.deepcopy(model)
        net = unwrap(work)
        layers = self.pruned_layers(work, config)
        excluded = [name for name, _ in prunable_layers(net) if name not in layers]
        hidden_names = list(config.hsic_layers) or [name for name, _ in prunable_layers(net)][:-1]
        run = _Runner(work, net, teacher, data, config, gen, coin, hidden_names)

        state = ADMMState(net, dict.fromkeys(layers, sparsity), rho=config.rho, projection=config.projection)
        opt = _sgd(work, config, config.admm_lr)
        history = []
        try:
            for epoch in range(1, config.admm_epochs + 1):
                state.reset_z(net)
                if (epoch - 1) % config.lr_cycle == 0 and epoch != 1:
                    if config.multi_rho:
                        state.scale_rho(config.rho_growth, cap=config.rho_cap)
                    state.update(net)
                lr = admm_cycle_lr(epoch, config.admm_lr, config.lr_cycle)
                for group in opt.param_groups:
                    group["lr"] = lr
                stats = run.epoch(opt, config.lambda_x, config.lambda_y, state=state)
                history.append(
                    stats | {"phase": "admm", "epoch": epoch, "lr": lr, "rho": state.rho, "admm_updates": state.updates}
                )

            masks = state.hard_prune(net)
            opt = _sgd(work, config, config.retrain_lr)
            n_iter = max(1, config.retrain_epochs * math.ceil(len(data.y) / config.batch_size))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_iter, eta_min=config.eta_min)
            for epoch in range(1, config.retrain_epochs + 1):
                stats = run.epoch(opt, config.retrain_lambda_x, config.retrain_lambda_y, masks=masks, sched=sched)
                history.append(stats | {"phase": "retrain", "epoch": epoch})
        finally:
            run.close()

        work.eval()
        report = measure_sparsity(work)
        native = {
            "prune_ratio": sparsity,
            "projection": config.projection,
            "layers": layers,
            "excluded_layers": excluded,
            "hsic_layers": hidden_names,
            "sparsity_of_pruned_layers": sparsity_of_layers(work, layers),
            "canonical_sparsity": report.sparsity,
        }
        return PruneResult(model=work, native_sparsity=native, config=config_dict(config), history=history)


def _check_config(config: PwoA.Config) -> None:
    if config.hsic_estimator not in ESTIMATORS:
        raise ValueError(f"hsic_estimator must be one of {', '.join(ESTIMATORS)}, got {config.hsic_estimator!r}")
    if config.projection not in ("irregular", "filter"):
        raise ValueError(f"projection must be 'irregular' or 'filter', got {config.projection!r}")
    if not 0.0 <= config.mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be in [0, 1], got {config.mix_ratio}")
    if config.lr_cycle < 1:
        raise ValueError(f"lr_cycle must be a positive number of epochs, got {config.lr_cycle}")


def _sgd(model: nn.Module, config: PwoA.Config, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


class _Runner:
    """One epoch of the PwoA objective; forward hooks on the student collect the hidden representations."""

    def __init__(self, work, net, teacher, data, config, gen, coin, hidden_names):
        self.work, self.net, self.teacher, self.data = work, net, teacher, data
        self.config, self.gen, self.coin = config, gen, coin
        self.hiddens: list[Tensor] = []
        modules = dict(net.named_modules())
        missing = [n for n in hidden_names if n not in modules]
        if missing:
            raise ValueError(f"hsic_layers not in the model: {', '.join(missing)}")
        self.handles = [modules[n].register_forward_hook(self._hook) for n in hidden_names]
        self.hsic = hsic_normalized if config.hsic_estimator == "normalized" else hsic_biased

    def _hook(self, module, inputs, output):
        self.hiddens.append(output)

    def close(self):
        for h in self.handles:
            h.remove()

    def _adversarial(self, xb: Tensor, yb: Tensor) -> Tensor:
        eps = self.config.mix_eps if self.config.mix_eps is not None else self.data.eps
        with eval_mode(self.work):
            return pgd_linf(
                self.work, xb, yb, eps=eps, steps=self.config.mix_steps, step_size=self.config.mix_step_ratio * eps
            )

    def epoch(self, opt, lambda_x, lambda_y, *, state=None, masks=None, sched=None) -> dict:
        cfg = self.config
        device = next(self.work.parameters()).device
        start = time.perf_counter()
        totals = {"kd_loss": 0.0, "hsic_x": 0.0, "hsic_y": 0.0, "admm_penalty": 0.0}
        seen, adv_batches = 0, 0
        use_hsic = lambda_x > 0 or lambda_y > 0
        self.work.train()
        for xb, yb in self.data.batches(cfg.batch_size, self.gen):
            xb, yb = xb.to(device), yb.to(device)
            if cfg.mix_ratio > 0 and self.coin.random() < cfg.mix_ratio:
                xb = self._adversarial(xb, yb)
                adv_batches += 1
            with torch.no_grad():
                t_logits = self.teacher(xb)
            self.hiddens = []
            logits = self.work(xb)
            hiddens, self.hiddens = self.hiddens, []
            loss = kd_loss(logits, t_logits, temperature=cfg.temperature, weight=cfg.kd_weight)
            totals["kd_loss"] += loss.item() * len(yb)
            if cfg.xentropy_weight:
                loss = loss + cfg.xentropy_weight * F.cross_entropy(logits, yb)
            if use_hsic and len(yb) > 1:
                onehot = F.one_hot(yb, logits.shape[1]).float()
                hx = sum(self.hsic(h, xb, cfg.hsic_sigma) for h in hiddens)
                hy = sum(self.hsic(h, onehot, cfg.hsic_sigma, kernel_y="linear") for h in hiddens)
                loss = loss + lambda_x * hx - lambda_y * hy
                totals["hsic_x"] += float(hx.detach()) * len(yb)
                totals["hsic_y"] += float(hy.detach()) * len(yb)
            if state is not None:
                penalty = state.penalty(self.net)
                loss = loss + penalty
                totals["admm_penalty"] += penalty.item() * len(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is None:
                opt.step()
            else:
                masked_step(opt, self.net, masks)
            if sched is not None:
                sched.step()
            seen += len(yb)
        out = {k: v / seen for k, v in totals.items()}
        return out | {"adversarial_batches": adv_batches, "wall_seconds": time.perf_counter() - start}


def convert_pwoa_checkpoint(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """A PwoA checkpoint as the bare architecture's state dict.

    PwoA saves a raw ``model.state_dict()`` of a network whose ``forward`` returns ``(logits, hiddens)`` (unless
    built with ``robustness=True``). The weights pass through unchanged (zeros are already in them); a
    ``module.model.`` (Madry-style) or ``module.`` (DataParallel) prefix is stripped, a ``{"state_dict": ...}``
    container is unwrapped and non-tensor values are dropped. Our plain module returns the logits only, i.e. the
    first element of the native output; the hidden representations are not part of the state dict.

    Raises:
        ValueError: no tensors were found.
    """
    sd: Mapping[str, object] = state_dict
    for key in _CONTAINER_KEYS:
        inner = sd.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            sd = inner
            break
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            break
    if not tensors:
        shown = ", ".join(map(str, list(state_dict)[:10])) or "none"
        raise ValueError(f"no weight tensors in this PwoA checkpoint (top-level keys: {shown})")
    return tensors
