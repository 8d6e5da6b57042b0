"""Prepare a model for the fastest execution that leaves the attacks' per-sample outcomes unchanged.

The attacks are the benchmark's cost (a robust sample takes about 12 000 forward passes under AutoAttack-plus),
so every setting here is one that changes *how* the network's arithmetic is scheduled, never *what* it computes:

* **channels_last** (NHWC) memory format for networks with 2-D convolutions: oneDNN on CPU and cuDNN on GPU have
  faster kernels for it (PyTorch's channels-last tutorial, https://pytorch.org/tutorials/intermediate/
  memory_format_tutorial.html). The weights are converted once, and a forward pre-hook converts each input at
  the model's boundary. The gradient with respect to the input is converted back to the standard layout, so the
  attacks' own tensors (steps, projections, norms) keep the layout and the reduction order they have with a
  plain model. A convolution kernel for another layout adds its products in another order, so logits move by a
  few units in the last place (about 1e-7 relative in float32), as they do between CPUs with different vector
  units. Unlike a change of thread count or of batch composition, which left FMN's distances bitwise unchanged on
  the digits model and on pyautoattack's ResNet-18, this is a change of the arithmetic: on the digits model some
  FMN distances move by one unit in the last place, and on the ResNet-18 FMN's 100 steps amplified it to 3e-5
  (ℓ∞, budget 8/255 ≈ 0.031) in 3 of 4 distances. Robust flags, the stage that broke a sample and adversarial
  predictions stayed equal (``tests/bench/test_performance.py``, ``benchmarks/attack_throughput.py``); a distance
  within that margin of eps could still flip a sample's FMN verdict. The setting is recorded with the results
  (:func:`execution_settings`), and ``channels_last=False`` keeps the plain model's arithmetic exactly.
* **frozen parameters** (``requires_grad=False``): FAB calls ``backward()`` once per class at every step, and
  with trainable parameters each call also computes and accumulates every weight's gradient, which no attack
  reads. The input gradient is computed by the same kernels either way (bitwise equal, tested).
* **full float32 on GPU**: TF32 off for cuDNN convolutions (on by default in PyTorch) and for matmuls, because
  TF32 rounds the inputs of every product to a 10-bit mantissa and changes which samples an attack breaks;
  ``cudnn.benchmark`` off and ``cudnn.deterministic`` on, because benchmark mode picks kernels by timing (a
  different kernel from run to run) and some cuDNN kernels add with atomics (a different order from run to run),
  and a resumed evaluation must recompute the same rows.

Not used, because each changes the arithmetic itself: folding BatchNorm into the convolutions, ``torch.compile``
(fused kernels round differently), TF32 or reduced precision, flushing denormals to zero.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

__all__ = ["ExecutionSettings", "exact_float_backends", "execution_settings", "fast_model", "prefers_channels_last"]

_SETTINGS_ATTR = "_apbench_execution"
# Relative tolerance for the layout check on a sample batch: kernel differences are a few float32 ulps; a model
# whose output moves by more than this in another layout does not compute the same function in it.
_LAYOUT_RTOL = 1e-4


@dataclass(frozen=True)
class ExecutionSettings:
    """How a prepared model runs; stored with the results so a last-bit difference can be traced to it.

    Attributes:
        device: the torch device the model lives on.
        channels_last: weights and inputs in channels_last (NHWC) memory format.
        frozen_parameters: the parameters do not require gradients.
        tf32: whether TF32 is allowed (always False: full float32 on every device).
        cudnn_deterministic: cuDNN restricted to deterministic kernels (None off CUDA).
    """

    device: str
    channels_last: bool
    frozen_parameters: bool
    tf32: bool = False
    cudnn_deterministic: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _ChannelsLastInput(torch.autograd.Function):
    """NCHW → NHWC copy whose backward hands the gradient back in the standard (NCHW-contiguous) layout.

    With a plain ``x.contiguous(memory_format=torch.channels_last)`` the input gradient would come back in NHWC
    strides: the attacks' reductions over it would then run in another order (another rounding), and code that
    calls ``.view`` on it (pyautoattack's zero-gradient check) would fail.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class ChannelsLastInputs:
    """Forward pre-hook converting a 4-D first argument to channels_last (a class, so the model still pickles
    for the evaluator's worker processes)."""

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], Tensor) or args[0].ndim != 4:
            return None
        x = args[0]
        if x.is_contiguous(memory_format=torch.channels_last):
            return None
        return (_ChannelsLastInput.apply(x), *args[1:])


def prefers_channels_last(model: nn.Module, device: str | torch.device) -> bool:
    """Whether channels_last speeds ``model`` up on ``device``: only networks with 2-D convolutions.

    Measured with ``benchmarks/attack_throughput.py``: on CPU (oneDNN) the convolution networks run faster in
    NHWC; a network of Linear layers only flattens its input first, so the conversion would be a pure extra copy.
    On CUDA cuDNN's NHWC kernels are the ones its documentation recommends; ``benchmarks/gpu_throughput.sh``
    measures both layouts on the card at hand.
    """
    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def exact_float_backends(device: str | torch.device) -> bool | None:
    """Full float32 and deterministic kernel choice on CUDA (process-wide settings; a no-op on CPU).

    Returns:
        ``torch.backends.cudnn.deterministic`` after the call on CUDA, None elsewhere.
    """
    if torch.device(device).type != "cuda":
        return None
    # TF32 keeps 10 mantissa bits of each product's inputs: logits change at the 1e-3 level and with them which
    # borderline samples an attack breaks. PyTorch enables it for cuDNN convolutions by default.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # benchmark mode times candidate kernels and keeps the fastest, which can differ between runs; deterministic
    # mode excludes the kernels that accumulate with atomics. Both so that a resumed chunk is recomputed exactly.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return True


def _remove_channels_last_hook(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, ChannelsLastInputs):
            del model._forward_pre_hooks[key]


def _outputs_agree(model: nn.Module, sample: Tensor) -> bool:
    """The model gives the same logits (to float rounding) with and without the channels_last input hook."""
    with torch.no_grad():
        _remove_channels_last_hook(model)
        plain = model(sample)
        model.register_forward_pre_hook(ChannelsLastInputs())
        fast = model(sample)
    scale = plain.abs().max().clamp(min=1.0)
    return bool(((fast - plain).abs().max() <= _LAYOUT_RTOL * scale).item())


def fast_model(
    model: nn.Module,
    device: str | torch.device,
    *,
    channels_last: bool | None = None,
    sample: Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) prepared for attack throughput on ``device``.

    The model is moved to ``device``, put in eval mode, its parameters frozen, converted to channels_last when
    :func:`prefers_channels_last` (or the ``channels_last`` argument) says so, and on CUDA the float backends are
    set for exact float32 (:func:`exact_float_backends`). Its class, submodules and state-dict keys are
    unchanged. Preparing a prepared model again re-prepares it without stacking hooks. The prepared model is for
    evaluation: its parameters no longer collect gradients, which is why the caller's model is left alone by
    default (a model trained or pruned after its evaluation must still train).

    Args:
        model: a network mapping inputs in [0, 1] to logits.
        device: where the attacks will run.
        channels_last: force the memory format; None decides by architecture and device.
        sample: a few inputs of the evaluation's shape: when given, channels_last is kept only if the model's
            logits on them agree with the standard layout's to float rounding (a model that reinterprets memory,
            e.g. with ``.view`` on a feature map, falls back to the standard layout instead of failing later).
        inplace: prepare ``model`` itself instead of a copy (saves one copy of the weights).

    Returns:
        The prepared model; :func:`execution_settings` reads back how.
    """
    dev = torch.device(device)
    if not inplace:
        model = copy.deepcopy(model)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _remove_channels_last_hook(model)
    use_cl = prefers_channels_last(model, dev) if channels_last is None else bool(channels_last)
    if use_cl:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(ChannelsLastInputs())
        if sample is not None and sample.ndim == 4:
            try:
                agree = _outputs_agree(model, sample.to(dev))
            except RuntimeError:  # e.g. .view on an NHWC feature map: "view size is not compatible"
                agree = False
            if not agree:
                _remove_channels_last_hook(model)
                model.to(memory_format=torch.contiguous_format)
                use_cl = False
    else:
        model.to(memory_format=torch.contiguous_format)
    settings = ExecutionSettings(
        device=str(dev),
        channels_last=use_cl,
        frozen_parameters=True,
        tf32=False,
        cudnn_deterministic=exact_float_backends(dev),
    )
    setattr(model, _SETTINGS_ATTR, settings)
    return model


def execution_settings(model: nn.Module) -> dict | None:
    """The settings :func:`fast_model` applied to ``model`` (for provenance), or None for a model it did not prepare."""
    settings = getattr(model, _SETTINGS_ATTR, None)
    return None if settings is None else settings.to_dict()
