"""Speed and distances of our ℓ∞ FMN against foolbox's ``LInfFMNAttack`` on the same model and samples.

The model is a small ReLU CNN on 3x32x32 inputs (two 3x3 convolutions with max-pooling, two linear
layers, 10 classes) behind a fixed normalisation layer, with fixed random He-initialised weights and zero
biases: it is *not trained*. Inputs are uniform random images and the labels are the model's own
predictions, so every sample starts correctly classified and both attacks search the same boundaries.
Both attacks run with the same hyperparameters (foolbox's defaults: α 1 → 0.01, γ 0.05 → 0.001).

Usage::

    python benchmarks/fmn_vs_foolbox.py --n 64 --steps 100 --seed 0 --threads 1

Prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import Tensor, nn

from bench.attacks import minimum_norm


class Normalize(nn.Module):
    """Fixed first layer: [0, 1] → [-2, 2]."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - 0.5) / 0.25


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize(),
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model.eval()


def best_of(repeats: int, fn):
    """Smallest wall time over ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="number of samples (one batch)")
    parser.add_argument("--steps", type=int, default=100, help="FMN iterations")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per attack; the fastest counts")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import foolbox as fb  # after set_num_threads; its import takes a few seconds

    model = small_cnn(args.seed)
    x = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)

    t_ours, ours = best_of(args.repeats, lambda: minimum_norm(model, x, y, norm=math.inf, steps=args.steps))
    attack = fb.attacks.LInfFMNAttack(steps=args.steps)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    t_fb, (_, fb_adv, fb_success) = best_of(args.repeats, lambda: attack(fmodel, x, y, epsilons=None))
    fb_distance = (fb_adv - x).flatten(1).abs().amax(dim=1)

    both = ours.success & fb_success
    med_ours = statistics.median(ours.distance[both].tolist()) if both.any() else math.nan
    med_fb = statistics.median(fb_distance[both].tolist()) if both.any() else math.nan
    per_sample = (ours.distance[both] / fb_distance[both]).tolist()

    print(
        f"model: random small CNN 3x32x32, n={args.n}, steps={args.steps}, seed={args.seed}, "
        f"threads={args.threads}, classes predicted={len(set(y.tolist()))}"
    )
    print(f"time ours        {t_ours:8.3f} s")
    print(f"time foolbox     {t_fb:8.3f} s")
    print(f"time ratio       {t_ours / t_fb:8.3f} (ours / foolbox)")
    print(f"success ours     {int(ours.success.sum()):5d} / {args.n}")
    print(f"success foolbox  {int(fb_success.sum()):5d} / {args.n}")
    print(f"median ours      {med_ours:.6f} (L-inf, samples both broke: {int(both.sum())})")
    print(f"median foolbox   {med_fb:.6f}")
    print(f"median ratio     {med_ours / med_fb:.4f} (ours / foolbox)")
    if per_sample:
        print(f"per-sample ratio min {min(per_sample):.4f}  max {max(per_sample):.4f}")


if __name__ == "__main__":
    main()
