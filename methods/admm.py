"""RAP-ADMM: robustness-aware pruning by ADMM under PGD adversarial training.

Ye et al., "Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019 (arXiv 1903.12561); reference
code yeshaokai/Robustness-Aware-Pruning-ADMM
(``admm/admm.py``, ``ADMM_examples/cifar10/{adv_main.py,config.py,config.yaml.example}``).

Pruning is posed as ``min_W f_adv(W) s.t. W_l ∈ S_l`` for every pruned layer l, where f_adv is Madry et al.'s
adversarial cross-entropy (the PGD point's CE only; the clean CE is logged by the code but not optimised) and
S_l is the set of tensors with at most a fraction ``1 − p_l`` of nonzero entries (``irregular``) or of nonzero
output filters (``filter``). ADMM splits it with an auxiliary Z and a scaled dual U (Boyd et al. 2011, §3.1.1;
the shared pieces are :class:`methods.common.ADMMState`):

1. **ADMM phase** (the code's ``--stage admm``): SGD on ``f_adv(W) + Σ_l ρ/2 ‖W_l − Z_l + U_l‖²``; Z starts at
   Π(W) and U at 0; at the start of every ``admm_interval``-th epoch ρ ← 1.3ρ (``multi_rho``, uncapped), then
   ``Z ← Π(W + U)`` and ``U ← U + W − Z``. The learning rate restarts at ``admm_lr`` with every interval and
   drops ×0.1 every interval/3 epochs (``admm_adjust_learning_rate``).
2. **Hard prune** (``masking``): ``W ← Π(W)`` per layer, the support kept as the mask.
3. **Masked retrain** (``--stage retrain``): PGD adversarial training again, with a fresh SGD optimiser and
   MultiStepLR; pruned weights stay exactly zero (:func:`methods.common.masked_step`).

Scope is local: one prune ratio per layer (the YAML's ``prune_ratios``). The example config prunes every
convolution, the first conv and ResNet shortcuts included, at the same ratio, and no linear layer; this adapter
does the same (``prune_linear=False``). The canonical sparsity (zero entries over *all* Conv2d/Linear weights) of
the result is therefore below the per-layer ratio whenever linear layers hold weights: on CIFAR ResNet-18 at
ratio 0.9 the FC's 5,120 weights lower it only to ~0.8996, but on the digits track's small CNN, whose two linear
layers hold 70 % of the weights, ratio 0.9 gives ~0.27. The adapter reads a canonical target ``s`` as the
method's own rule does: ratio ``s`` in every pruned layer (measured sparsity over those layers = s), and
records both the ratio and the canonical measurement in ``native_sparsity``.

Differences from the released code, each deliberate:

- ``detach_u=True`` (default) detaches U as the algorithm is written. The code's ``admm_update`` builds U from W
  without ``detach``, so after k updates the penalty's gradient is ``(1 + k)·ρ(W − Z + U)``; ``detach_u=False``
  reproduces that.
- The projection prunes exactly ``int(p · n)`` entries (filters) per layer with ties broken by position; the code
  thresholds at ``numpy.percentile``, which can differ by one entry and keeps exact ties.
- The clean forward pass the code runs (for logging) is skipped; in train mode it only nudges BatchNorm running
  statistics once more per batch.
- No model selection on the test set (the code keeps the retrain epoch with the lowest mean clean/adversarial
  *test* loss); the last epoch is returned.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models import unwrap
from bench.sparsity import measure_sparsity
from bench.training import pgd_linf
from methods.base import MethodCard, PruneData, PruneResult, PruningMethod, config_dict, register_method
from methods.common import ADMMState, masked_step, pgd_ce_loss, prunable_layers, sparsity_of_layers

__all__ = ["RAPADMM", "admm_learning_rate", "adversarial_ce", "build_admm_state", "convert_admm_checkpoint"]

PROJECTIONS = ("irregular", "filter")
# DataParallel(AttackPGD(model)).state_dict() keys, then the two partial wrappings; longest first.
_WRAPPER_PREFIXES = ("module.basic_model.", "basic_model.", "module.")
# Keys under which a training script (or the Piras et al. benchmark's re-saved files) may nest the weights.
_CONTAINER_KEYS = ("state_dict", "net", "model")


def admm_learning_rate(epoch: int, lr: float, interval: int) -> float:
    """The released ADMM-phase schedule (``admm_adjust_learning_rate``): cyclic with the Z/U updates.

    At epochs divisible by ``interval`` the rate is reset to ``lr``; in between it is
    ``lr · 0.1^⌊(epoch mod interval) / (interval / 3)⌋`` (interval 20: epochs 0–6 of a cycle at lr, 7–13 at
    lr/10, 14–19 at lr/100).
    """
    offset = epoch % interval
    return lr * 0.1 ** (offset // (interval / 3))


def adversarial_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    attack_train_mode: bool = True,
    box_start: bool = False,
) -> Tensor:
    """Madry et al.'s PGD adversarial cross-entropy (batch mean) as RAP-ADMM trains with it.

    Args:
        model: the network, in train mode during training.
        x, y: clean inputs in [0, 1] and labels.
        eps: L∞ radius.
        steps: PGD steps (uniform random start).
        step_size: PGD step α.
        attack_train_mode: run the attack in the caller's (train) mode, as the released ``AttackPGD`` wrapper
            does inside the training forward pass, so BatchNorm uses batch statistics for the attack and its
            running statistics see every attack iteration. False runs it in eval mode
            (:func:`methods.common.pgd_ce_loss`).
        box_start: start PGD uniformly in B∞(x, ε) ∩ [0, 1] instead of the released code's uniform point of the
            ball clipped to [0, 1] (:func:`bench.training.uniform_in_box`).

    Returns:
        ``CE(f(x'), y)`` at the PGD point x' (‖x' − x‖∞ ≤ ε, x' ∈ [0, 1]); the outer forward runs in the
        caller's mode.
    """
    if not attack_train_mode:
        return pgd_ce_loss(model, x, y, eps=eps, steps=steps, step_size=step_size, box_start=box_start)
    x_adv = pgd_linf(model, x, y, eps=eps, steps=steps, step_size=step_size, box_start=box_start)
    return F.cross_entropy(model(x_adv), y)


def build_admm_state(net: nn.Module, layers: list[str], prune_ratio: float, config: RAPADMM.Config) -> ADMMState:
    """Z = Π(W), U = 0 for ``layers`` of ``net`` at one ratio (the code's ``admm_initialization``)."""
    return ADMMState(
        net,
        dict.fromkeys(layers, prune_ratio),
        rho=config.rho,
        projection=config.projection,
        detach_u=config.detach_u,
    )


@register_method("admm")
class RAPADMM(PruningMethod):
    """RAP-ADMM (Ye et al., ICCV 2019): ADMM pruning with PGD adversarial training, then masked PGD-AT retrain."""

    card = MethodCard(
        key="admm",
        display_name="RAP-ADMM",
        ap_key="RADMM_Ye2019Adversarial",
        paper_title="Adversarial Robustness vs. Model Compression, or Both?",
        paper_url="https://arxiv.org/abs/1903.12561",
        venue="ICCV",
        year=2019,
        pipeline="A",
        training={"pretraining": "AT-PGD", "finetuning": "AT-PGD", "1S/IT": "1S"},
        structure="US",
        scope="local",
        criterion="SOLWM",
        losses=("PGD-AT", "ADMM"),
        native_sparsity="per-layer prune ratio (fraction pruned) from the config",
    )

    @dataclass(frozen=True)
    class Config:
        """The released CIFAR-10 schedule (``config.yaml.example``, ``adv_main.py``, ``admm/admm.py``).

        Attributes:
            admm_epochs: epochs of the ADMM phase (``admm.epochs``: 200).
            admm_interval: epochs between Z/U updates (``admm_epoch``: 20); the first update is at this epoch.
            rho: initial penalty ρ, the same for every layer (0.001).
            multi_rho: grow ρ before every Z/U update (True in the example).
            rho_growth: the factor of that growth (1.3 in ``admm_multi_rho_scheduler``; no cap).
            admm_lr: ADMM-phase learning rate at the start of every cycle (0.01); see :func:`admm_learning_rate`.
            retrain_epochs: epochs of masked retraining (``retrain.epochs``: 200).
            retrain_lr: initial retraining learning rate (0.01).
            retrain_milestones: retraining epochs where the rate drops ×``lr_gamma`` (the code's default
                scheduler for adversarial training: 80 and 150).
            lr_gamma: the drop factor (0.1).
            optimizer: ``"sgd"`` (momentum 0.9, weight decay 1e-4, as in both stages) or ``"adam"`` (the code's
                other choice: no weight decay).
            momentum, weight_decay: SGD's.
            batch_size: training minibatch (128).
            pgd_steps: PGD steps of the training attack (10).
            pgd_step_ratio: PGD step size as a fraction of eps (2/255 at 8/255: 0.25).
            attack_train_mode: attack in train mode, as the code's ``AttackPGD`` forward does (see
                :func:`adversarial_ce`).
            prune_linear: also prune Linear layers at the same ratio (the example config prunes convolutions only).
            projection: ``"irregular"`` (weights; the paper's main setting) or ``"filter"`` (whole output
                filters by L2 norm). The code's ``column`` and ``bn_filter`` are not offered.
            detach_u: detach U in the Z/U update (the algorithm); False reproduces the code's undetached U, whose
                penalty gradient is (1 + k)× the textbook one after k updates.
            box_start: start the training attack uniformly in B∞(x, ε) ∩ [0, 1] instead of the code's uniform
                point of the ε-ball clipped to [0, 1] (False, the released code; the digits track sets True, see
                :meth:`digits_config`).
        """

        admm_epochs: int = 200
        admm_interval: int = 20
        rho: float = 1e-3
        multi_rho: bool = True
        rho_growth: float = 1.3
        admm_lr: float = 0.01
        retrain_epochs: int = 200
        retrain_lr: float = 0.01
        retrain_milestones: tuple[int, ...] = (80, 150)
        lr_gamma: float = 0.1
        optimizer: str = "sgd"
        momentum: float = 0.9
        weight_decay: float = 1e-4
        batch_size: int = 128
        pgd_steps: int = 10
        pgd_step_ratio: float = 0.25
        attack_train_mode: bool = True
        prune_linear: bool = False
        projection: str = "irregular"
        detach_u: bool = True
        box_start: bool = False

    def digits_config(self, **overrides):
        """CPU-sized schedule of the digits track (small_cnn, eps 0.2): 6 ADMM + 4 retrain epochs, batch 64, PGD-5.

        A miniature of the released schedule: Z/U updates every 2 epochs (at epochs 2 and 4, ρ ×1.3 each time),
        so every ADMM cycle runs one epoch at ``admm_lr`` and one at a tenth of it; retraining drops the rate
        ×0.1 for its last epoch. ρ, the learning rates and the optimiser are the code's. Measured on the 1,437
        digits training images, one thread of a shared 2-core CPU: 14–18 s for the whole run (about 1.4 s per
        epoch). From the track's dense model (98.9 % clean) at ratio 0.9 it keeps 98.3 % clean accuracy.

        Unlike the paper's CIFAR setting, the digits track also prunes the linear layers (``prune_linear=True``):
        the small CNN keeps 70 % of its weights in them, so with convolutions alone a "0.9" model would be only
        27 % sparse by the canonical measure, and not comparable with the other methods at the same target.

        The training attack starts uniformly in B∞(x, ε) ∩ [0, 1] (``box_start=True``), as HYDRA's digits schedule
        does, for the same reason. At 95 % sparsity the small CNN keeps 8 of its 144 first-layer weights, one per
        live filter, so each first-layer unit reads one pixel and fires only above a threshold; the released start
        (the ball, then clipped) leaves about 88 % of a digit's blank pixels (exactly 0) below the lowest
        threshold (0.151 < ε = 0.2), where the input gradient is exactly 0 and PGD never moves them. Trained
        against such an attack, the model was robust to gradient attacks only: AutoAttack's Square broke 51 digits
        that APGD and FAB left (``benchmarks/track_stability.py`` at 0.95 before: PGD-20 median 60.0 %,
        AutoAttack-plus 34.4 % on seed 0). Started in the box, training raised the thresholds (0.163–0.194 on
        seed 0) and Square's extra breaks fell to 8, HYDRA's level; ``docs/figures/track_stability.md`` has the
        rows it gives. ``--set box_start=false`` runs the released start.
        """
        defaults = {
            "admm_epochs": 6,
            "admm_interval": 2,
            "retrain_epochs": 4,
            "retrain_milestones": (3,),
            "batch_size": 64,
            "pgd_steps": 5,
            "prune_linear": True,
            "box_start": True,
        }
        return self.config(**{**defaults, **overrides})

    def pruned_layers(self, model: nn.Module, config: Config | None = None) -> list[str]:
        """Names (in the bare architecture, as :func:`bench.sparsity.measure_sparsity` reports them) of the
        layers pruned: every Conv2d, first and shortcuts included, plus every Linear if ``prune_linear``."""
        config = config or self.config()
        return [name for name, _ in prunable_layers(unwrap(model), include_linear=config.prune_linear)]

    def prune(
        self, model: nn.Module, sparsity: float, data: PruneData, config: Config, *, seed: int = 0
    ) -> PruneResult:
        """Prune ``model`` with ratio ``sparsity`` in every pruned layer: ADMM phase, hard prune, masked retrain.

        Args:
            model: the dense PGD-adversarially-trained network (left unchanged).
            sparsity: canonical target; used as the per-layer prune ratio of every pruned layer, so the
                fraction of zeros over those layers equals it (up to ``int`` rounding per layer).
            data: training images in [0, 1], labels and the L∞ eps of the training attack.
            config: a :class:`RAPADMM.Config`.
            seed: seeds the batch order and the PGD random starts.

        Returns:
            A deep copy of ``model`` with the same state-dict keys, pruned weights exactly 0.0, and
            ``native_sparsity`` holding the ratio, the pruned and excluded layers and the measured sparsities.
        """
        self.check_sparsity(sparsity)
        _check_config(config)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        work = copy.deepcopy(model)
        net = unwrap(work)
        layers = self.pruned_layers(work, config)
        excluded = [name for name, _ in prunable_layers(net) if name not in layers]
        step_size = config.pgd_step_ratio * data.eps

        state = build_admm_state(net, layers, sparsity, config)
        opt = _optimizer(work, config, config.admm_lr)
        history = []
        for epoch in range(config.admm_epochs):
            if epoch > 0 and epoch % config.admm_interval == 0:
                if config.multi_rho:
                    state.scale_rho(config.rho_growth)
                state.update(net)
            lr = admm_learning_rate(epoch, config.admm_lr, config.admm_interval)
            history.append(
                _epoch(work, data, config, gen, opt, lr=lr, step_size=step_size, state=state, net=net)
                | {
                    "phase": "admm",
                    "epoch": epoch + 1,
                    "rho": state.rho,
                    "admm_updates": state.updates,
                    "primal_residual": _norm(state.residuals(net).values()),
                }
            )

        masks = state.hard_prune(net)
        # A fresh optimiser, as the retrain stage is a separate run of the code.
        opt = _optimizer(work, config, config.retrain_lr)
        for epoch in range(config.retrain_epochs):
            drops = sum(epoch >= m for m in config.retrain_milestones)
            lr = config.retrain_lr * config.lr_gamma**drops
            history.append(
                _epoch(work, data, config, gen, opt, lr=lr, step_size=step_size, masks=masks, net=net)
                | {"phase": "retrain", "epoch": epoch + 1}
            )

        work.eval()
        report = measure_sparsity(work)
        native = {
            "prune_ratio": sparsity,
            "projection": config.projection,
            "layers": layers,
            "excluded_layers": excluded,
            "sparsity_of_pruned_layers": sparsity_of_layers(work, layers),
            "canonical_sparsity": report.sparsity,
        }
        return PruneResult(model=work, native_sparsity=native, config=config_dict(config), history=history)


def _check_config(config: RAPADMM.Config) -> None:
    if config.projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {config.projection!r}")
    if config.optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
    if config.admm_interval < 1:
        raise ValueError(f"admm_interval must be a positive number of epochs, got {config.admm_interval}")


def _optimizer(model: nn.Module, config: RAPADMM.Config, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _norm(values) -> float:
    return sum(v * v for v in values) ** 0.5


def _epoch(
    model: nn.Module,
    data: PruneData,
    config: RAPADMM.Config,
    gen: torch.Generator,
    opt: torch.optim.Optimizer,
    *,
    lr: float,
    step_size: float,
    net: nn.Module,
    state: ADMMState | None = None,
    masks: Mapping[str, Tensor] | None = None,
) -> dict:
    """One epoch of PGD-AT, plus the ADMM penalty (ADMM phase) or with masked steps (retrain)."""
    for group in opt.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    start = time.perf_counter()
    adv_total, pen_total, seen = 0.0, 0.0, 0
    model.train()
    for xb, yb in data.batches(config.batch_size, gen):
        xb, yb = xb.to(device), yb.to(device)
        adv = adversarial_ce(
            model,
            xb,
            yb,
            eps=data.eps,
            steps=config.pgd_steps,
            step_size=step_size,
            attack_train_mode=config.attack_train_mode,
            box_start=config.box_start,
        )
        loss = adv
        if state is not None:
            penalty = state.penalty(net)
            loss = adv + penalty
            pen_total += penalty.item() * len(yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is None:
            opt.step()
        else:
            masked_step(opt, net, masks)
        adv_total += adv.item() * len(yb)
        seen += len(yb)
    out = {"lr": lr, "adv_loss": adv_total / seen, "wall_seconds": time.perf_counter() - start}
    if state is not None:
        out["admm_penalty"] = pen_total / seen
    return out


def convert_admm_checkpoint(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """A RAP-ADMM checkpoint as the bare architecture's state dict (zeros are already in the weights).

    The released code saves ``DataParallel(AttackPGD(model)).state_dict()``, so every key starts with
    ``module.basic_model.``; a lone ``basic_model.`` (no DataParallel) or ``module.`` (no AttackPGD) is stripped
    as well. ``AttackPGD`` has no parameters or buffers of its own; any key outside the detected prefix and
    any non-tensor value is dropped. A container such as ``{"state_dict": ...}`` or ``{"net": ...}`` (how the
    Piras et al. benchmark tries its re-saved files) is unwrapped first. Keys stay the author's (no ``net.``);
    :func:`bench.checkpoints.load_weights` maps them onto a :class:`~bench.models.NormalizedModel`.

    Architectures: the Piras et al. benchmark's RAP-ADMM models (its ``models/radmm.py``) are the released
    code's ``ResNet18()`` and ``VGG('vgg16')``, i.e. kuangliu/pytorch-cifar's. Their module names and shapes are
    those of ``bench.models``' ``resnet18`` (``conv1``, ``bn1``, ``layer{1-4}.{0,1}.{conv,bn}{1,2}``,
    ``shortcut.{0,1}``, ``linear``) and ``vgg16_bn`` (``features.<i>`` convolutions *with* bias + BN,
    ``classifier = Linear(512, 10)``), so no renaming is needed; ResNet-18's ``avg_pool2d(out, 4)`` equals our
    adaptive pooling on 32×32 inputs. The paper's width-multiplier variants (``ResNet18_adv``, ``VGG_adv``,
    ``LeNet_adv``) have other channel counts and fit no registered architecture. The code adds no input
    normalisation, so such weights expect raw [0, 1] inputs: build the model with mean 0 and std 1.

    Args:
        state_dict: the loaded checkpoint (a state dict, or a dict nesting one).

    Returns:
        ``{key: tensor}`` with the wrapper prefixes removed.

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
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            break
    if not tensors:
        shown = ", ".join(map(str, list(state_dict)[:10])) or "none"
        raise ValueError(f"no weight tensors in this RAP-ADMM checkpoint (top-level keys: {shown})")
    return tensors
