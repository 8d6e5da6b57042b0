"""HYDRA: pruning by learned importance scores under an adversarial (TRADES) objective.

Sehwag, Wang, Mittal, Jana, "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020
(arXiv 2002.10509); reference code inspire-group/hydra.

The pruning problem is posed as an empirical-risk minimisation over the mask: every
Conv2d/Linear weight ``w`` gets a real-valued importance score ``s`` (``popup_scores``, same shape), and the
forward pass uses ``w ⊙ m`` where ``m`` keeps the top-k fraction of ``|s|`` inside each layer. Scores start
proportional to the pretrained weights (the paper's scaled initialisation), so the first mask is the
least-weight-magnitude (LWM) one; they are trained with the robust loss through a straight-through
estimator while the weights stay frozen (prune phase), then the mask is fixed and the kept weights are
fine-tuned with the same loss (finetune phase). Skipping the prune phase (``prune_epochs=0``) gives the
paper's LWM baseline.

The subnet is built without replacing the architecture's classes: each layer gets a ``popup_scores``
parameter and :class:`_Subnet` runs the unchanged network through :func:`torch.func.functional_call` with
``weight ← w ⊙ m``. The working copy's state dict is therefore HYDRA's subnet format (``<layer>.weight`` +
``<layer>.popup_scores``), and the returned model is a deep copy of the input with the same keys and no
scores.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from methods.base import MethodCard, PruneData, PruneResult, PruningMethod, config_dict, register_method
from methods.common import apply_masks, masked_step, prunable_layers, trades_loss

__all__ = ["Hydra", "convert_hydra_checkpoint", "hydra_mask", "scaled_scores"]

SCORES = "popup_scores"
_DATA_PARALLEL_PREFIX = "module."


def hydra_mask(popup_scores: Tensor, k: float) -> Tensor:
    """HYDRA's per-layer subnet mask: keep the top-k fraction of ``|s|``.

    The ``int((1 − k) · numel)`` smallest entries of ``|s|`` (ascending sort, ties broken by position) are
    removed and the rest kept, so ``numel − int((1 − k) · numel) ≥ k · numel`` entries survive (reference
    code: ``GetSubnet`` in ``models/layers.py``).

    Args:
        popup_scores: a layer's importance scores (any shape).
        k: fraction of entries kept, in (0, 1].

    Returns:
        A boolean mask of the scores' shape, True where the weight is kept.
    """
    flat = popup_scores.detach().abs().flatten()
    removed = int((1 - k) * flat.numel())
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:removed]] = False
    return keep.view_as(popup_scores)


def scaled_scores(weight: Tensor) -> Tensor:
    """The paper's scaled score initialisation ``s = sqrt(6 / fan_in) · w / max|w|`` (``initialize_scaled_score``).

    ``|s|`` is proportional to ``|w|``, so the first mask is the LWM mask, and ``max|s| = sqrt(6 / fan_in)``
    matches the bound of Kaiming-uniform initialisation.
    """
    fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
    return math.sqrt(6 / fan_in) * weight.detach() / weight.detach().abs().max()


class _StraightThrough(torch.autograd.Function):
    """Returns the (precomputed) mask; its gradient goes to ``|s|`` unchanged (straight-through estimator).

    With ``w_eff = w ⊙ m(|s|)`` this gives ``∂L/∂s = sign(s) ⊙ w ⊙ ∂L/∂w_eff`` (the sign comes from ``abs``).
    """

    @staticmethod
    def forward(ctx, abs_scores: Tensor, mask: Tensor) -> Tensor:
        return mask.to(abs_scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _Subnet(nn.Module):
    """Runs ``model`` with every scored layer's weight replaced by ``w ⊙ mask(|popup_scores|)``.

    Masks are recomputed only when a score tensor changes (its in-place version counter), so the sort runs
    once per optimiser step rather than once per forward pass of the inner attack.
    """

    def __init__(self, model: nn.Module, layers: list[str], k: float) -> None:
        super().__init__()
        self.model = model
        self.k = k
        modules = dict(model.named_modules())
        # A plain dict (not a ModuleDict) so the layers are not registered twice.
        self.layers: dict[str, nn.Module] = {name: modules[name] for name in layers}
        self._cache: dict[str, tuple[Tensor, int, Tensor]] = {}

    def masks(self) -> dict[str, Tensor]:
        """The current boolean mask of every scored layer (HYDRA's top-k of ``|popup_scores|``)."""
        out = {}
        for name, layer in self.layers.items():
            scores = getattr(layer, SCORES)
            cached = self._cache.get(name)
            if cached is None or cached[0] is not scores or cached[1] != scores._version:
                cached = (scores, scores._version, hydra_mask(scores, self.k))
                self._cache[name] = cached
            out[name] = cached[2]
        return out

    def forward(self, x: Tensor) -> Tensor:
        weights = {}
        for name, mask in self.masks().items():
            layer = self.layers[name]
            weights[f"{name}.weight"] = layer.weight * _StraightThrough.apply(getattr(layer, SCORES).abs(), mask)
        return functional_call(self.model, weights, (x,), strict=False)


def _cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    # Cosine annealing per epoch (epoch counted from 0). The reference code uses (epoch − 1) / epochs, which
    # is a negligible shift at 20–100 epochs but gives lr 0 (no update at all) in a one-epoch run.
    return lr * 0.5 * (1 + math.cos(epoch / epochs * math.pi))


@register_method("hydra")
class Hydra(PruningMethod):
    """HYDRA (Sehwag et al., NeurIPS 2020): learned importance scores, TRADES prune then TRADES finetune."""

    card = MethodCard(
        key="hydra",
        display_name="HYDRA",
        ap_key="HYDRA_Sehwag2020Hydra",
        paper_title="HYDRA: Pruning Adversarially Robust Neural Networks",
        paper_url="https://arxiv.org/abs/2002.10509",
        venue="NeurIPS",
        year=2020,
        pipeline="A",
        training={"pretraining": "AT-TRADES", "finetuning": "AT-TRADES", "1S/IT": "1S"},
        structure="US",
        scope="local",
        criterion="LIS",
        losses=("TRADES",),
        native_sparsity="k = fraction of weights kept per layer",
    )

    @dataclass(frozen=True)
    class Config:
        """HYDRA's schedule: the paper's CIFAR-10 setting as in the reference ``configs/configs.yml`` and scripts.

        Attributes:
            prune_epochs: epochs training the scores (0 gives the LWM baseline).
            finetune_epochs: epochs fine-tuning the kept weights.
            lr_prune, lr_finetune: initial SGD learning rates, cosine-annealed per epoch.
            momentum: SGD momentum.
            weight_decay: SGD weight decay; in the prune phase it also decays the scores, as in the code.
            batch_size: minibatch size.
            beta: TRADES trade-off β.
            pgd_steps: PGD steps of the TRADES inner maximisation.
            step_size_ratio: PGD step size as a fraction of eps (2/255 at eps 8/255).
            scaled_score_init: initialise scores as ``sqrt(6/fan_in)·w/max|w|``; otherwise Kaiming-uniform
                (``a = sqrt(5)``), HYDRA's layer default.
            freeze_bn: also freeze BatchNorm affine parameters while pruning (HYDRA's ``--freeze-bn``).
            random_start: start TRADES' inner maximisation at a uniform point of B∞(x, ε) ∩ [0, 1] instead of
                the code's ``x + 0.001·N(0, I)`` (off in the paper's setting; on in :meth:`digits_config`, see there).
        """

        prune_epochs: int = 20
        finetune_epochs: int = 100
        lr_prune: float = 0.1
        lr_finetune: float = 0.01
        momentum: float = 0.9
        weight_decay: float = 1e-4
        batch_size: int = 128
        beta: float = 6.0
        pgd_steps: int = 10
        step_size_ratio: float = 0.25
        scaled_score_init: bool = True
        freeze_bn: bool = False
        random_start: bool = False

    def digits_config(self, **overrides):
        """CPU-sized schedule of the digits track: 3 prune + 5 finetune epochs, batch 64, PGD-5, uniform start.

        Why ``random_start=True`` (the one change to TRADES itself): a digit's background is exactly 0, and at
        high sparsity HYDRA keeps a handful of first-layer weights (8 of 144 at k = 0.05), so a first-layer
        channel reads a single pixel through ``relu(w·z + b)``. Once every unit that reads a blank pixel is off
        there, the input gradient at a blank pixel is exactly 0. TRADES' inner attack starts at
        ``x + 0.001·N(0, I)`` and takes sign steps, and ``sign(0) = 0``: it never perturbs the background (about
        half of all pixels), so the KL term never sees a perturbed background and nothing keeps a unit's kink
        more than ε above it. The model then resists only the attack it trains against: on a pruning seed that
        collapsed, AutoAttack and PGD examples transferred from a later checkpoint broke nearly every test digit
        while our PGD-20 still reported several times more robust accuracy, and that figure slid epoch by epoch.
        When a kink finally crosses the blank value (there, a bias change in the third decimal: at any learning
        rate, even the last epoch's) the background gradient appears, the TRADES loss jumps and PGD-20 falls to
        what the robustness really was. Which seeds this hits depends on the draw; PGD-10 (HYDRA's own step
        count) does not prevent it, since more sign steps cannot move a zero-gradient pixel. The digits schedule
        starts at a uniform point of B∞(x, ε) ∩ [0, 1], so every blank pixel starts somewhere in (0, ε] and the
        attack explores the background past any kink within reach; TRADES then trains against perturbed
        backgrounds too (as PGD with a random start does for the dense parent). The box matters: sampling the
        ε-ball and clipping leaves half of the blank pixels at exactly 0, and models trained that way were
        stable under PGD-20, but AutoAttack's gradient-free Square stage then broke tens of test digits that its
        gradient attacks had left (the mark of masked gradients). ``benchmarks/track_stability.py --methods hydra
        --sparsities 0.95 --set random_start=false --out …`` runs the paper-start schedule;
        ``docs/figures/track_stability.md`` holds the measured figures of this one.
        """
        defaults = {"prune_epochs": 3, "finetune_epochs": 5, "batch_size": 64, "pgd_steps": 5, "random_start": True}
        return self.config(**{**defaults, **overrides})

    def prune(
        self, model: nn.Module, sparsity: float, data: PruneData, config: Config, *, seed: int = 0
    ) -> PruneResult:
        """Prune ``model`` to canonical ``sparsity`` (k = 1 − sparsity kept per layer, every Conv2d/Linear).

        Args:
            model: the dense (adversarially pretrained) network; it is not modified.
            sparsity: fraction of Conv2d/Linear weights to zero.
            data: training images in [0, 1], labels and the L∞ eps of TRADES.
            config: a :class:`Hydra.Config`.
            seed: seeds score initialisation (when not scaled), batch order and TRADES' start noise.

        Returns:
            A deep copy of ``model`` with ``weight ← weight ⊙ mask``, no score parameters, the same state-dict
            keys, and ``native_sparsity={"k": k}``.
        """
        self.check_sparsity(sparsity)
        # Rounded so that k is the number a HYDRA user would pass (--k 0.05), not 1 − 0.95 = 0.05000000000000004.
        k = round(1.0 - sparsity, 12)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        work = copy.deepcopy(model)
        subnet = attach_scores(work, k, scaled=config.scaled_score_init)
        history: list[dict] = []
        if config.prune_epochs > 0:
            set_phase(work, "prune", freeze_bn=config.freeze_bn)
            history += _train(subnet, data, config, gen, phase="prune", epochs=config.prune_epochs, lr=config.lr_prune)
        masks = subnet.masks()
        if config.finetune_epochs > 0:
            set_phase(work, "finetune")
            apply_masks(work, masks)
            history += _train(
                subnet,
                data,
                config,
                gen,
                phase="finetune",
                epochs=config.finetune_epochs,
                lr=config.lr_finetune,
                masks=masks,
            )
        pruned = copy.deepcopy(model)
        pruned.load_state_dict(convert_hydra_checkpoint(work.state_dict(), k=k))
        return PruneResult(model=pruned.eval(), native_sparsity={"k": k}, config=config_dict(config), history=history)


def attach_scores(model: nn.Module, k: float, *, scaled: bool = True) -> _Subnet:
    """Give every Conv2d/Linear of ``model`` (in place) a ``popup_scores`` parameter and wrap it as a subnet.

    Args:
        model: the network; HYDRA scores every convolution (first, shortcuts) and linear layer (last FC).
        k: fraction kept per layer.
        scaled: scaled score initialisation (otherwise Kaiming-uniform with ``a = sqrt(5)``).

    Returns:
        The subnet module whose forward uses ``w ⊙ mask``; ``model`` keeps its classes and gains score keys.
    """
    names = []
    for name, layer in prunable_layers(model):
        scores = torch.empty_like(layer.weight)
        if scaled:
            scores.copy_(scaled_scores(layer.weight))
        else:
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        layer.register_parameter(SCORES, nn.Parameter(scores))
        names.append(name)
    return _Subnet(model, names, k)


def set_phase(model: nn.Module, phase: str, *, freeze_bn: bool = False) -> None:
    """Which parameters train (reference code: ``prepare_model``/``freeze_vars``).

    Prune: the scores and (unless ``freeze_bn``) BatchNorm affine parameters; weights and biases are frozen.
    Finetune: everything except the scores.
    """
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for pname, param in module.named_parameters(recurse=False):
            if phase == "prune":
                param.requires_grad_(pname == SCORES or (is_bn and not freeze_bn))
            elif phase == "finetune":
                param.requires_grad_(pname != SCORES)
            else:
                raise ValueError(f"unknown HYDRA phase {phase!r}; expected 'prune' or 'finetune'")


def _train(
    subnet: _Subnet,
    data: PruneData,
    config: Hydra.Config,
    gen: torch.Generator,
    *,
    phase: str,
    epochs: int,
    lr: float,
    masks: dict[str, Tensor] | None = None,
) -> list[dict]:
    """TRADES epochs of one phase with SGD (weight decay on every trained parameter, scores included)."""
    params = [p for p in subnet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    step_size = config.step_size_ratio * data.eps
    history = []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(lr, epoch, epochs)
        start = time.perf_counter()
        total, seen = 0.0, 0
        subnet.train()
        for xb, yb in data.batches(config.batch_size, gen):
            loss = trades_loss(
                subnet,
                xb,
                yb,
                eps=data.eps,
                steps=config.pgd_steps,
                step_size=step_size,
                beta=config.beta,
                random_start=config.random_start,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is None:
                opt.step()
            else:
                masked_step(opt, subnet.model, masks)
            total += loss.item() * len(yb)
            seen += len(yb)
        history.append(
            {
                "phase": phase,
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "trades_loss": total / seen,
                "wall_seconds": time.perf_counter() - start,
            }
        )
    subnet.eval()
    return history


def convert_hydra_checkpoint(state_dict: Mapping[str, Tensor], *, k: float | None) -> dict[str, Tensor]:
    """A HYDRA checkpoint as a plain state dict: ``weight ← weight ⊙ mask(|popup_scores|)``, scores dropped.

    For every ``<layer>.popup_scores`` the top-k mask is computed with HYDRA's rule (:func:`hydra_mask`, the
    same as the reference ``subnet_to_dense``) and multiplied into ``<layer>.weight``. A ``module.`` prefix
    (DataParallel) is stripped. A ``*_dense`` checkpoint (no scores) passes through otherwise unchanged.

    Keys stay the author's (no ``net.``); :func:`bench.checkpoints.load_weights` maps them onto a
    ``NormalizedModel``. The released files use HYDRA's own architectures, which differ from ours: its
    ``vgg16_bn`` has bias-free convolutions, no final max-pool, ``AdaptiveAvgPool2d((2, 2))`` and a three-layer
    classifier (2048–256–256–10): that network is registered as ``vgg16_bn_hydra``, with HYDRA's key names. Its
    WRN-28-4 carries the unused ``sub_block1``, which :func:`bench.formats.load_converted` drops. This function only
    turns subnet weights into dense ones.

    Args:
        state_dict: the checkpoint's ``state_dict``.
        k: the kept fraction the checkpoint was pruned with; required when scores are present.

    Returns:
        The converted state dict.

    Raises:
        ValueError: scores are present but ``k`` is None or outside (0, 1], or a score tensor has no weight
            of the same shape.
    """
    sd = {key.removeprefix(_DATA_PARALLEL_PREFIX): value for key, value in state_dict.items()}
    score_keys = [key for key in sd if key == SCORES or key.endswith(f".{SCORES}")]
    if not score_keys:
        return sd
    if k is None:
        raise ValueError(
            "this HYDRA checkpoint has popup_scores but k (the fraction of weights kept) is not stored in "
            "HYDRA checkpoints; give it with --k, e.g. 0.05 from a folder named 'k-0.05'"
        )
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is the fraction of weights kept and must be in (0, 1], got {k}")
    out = {key: value for key, value in sd.items() if key not in score_keys}
    for key in score_keys:
        weight_key = key.removesuffix(SCORES) + "weight"
        weight = sd.get(weight_key)
        if weight is None or weight.shape != sd[key].shape:
            found = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
            raise ValueError(
                f"{key} of shape {tuple(sd[key].shape)} needs a weight {weight_key} of the same shape, but it is "
                f"{found}; is this a HYDRA subnet checkpoint?"
            )
        out[weight_key] = weight * hydra_mask(sd[key], k).to(weight.dtype)
    return out
