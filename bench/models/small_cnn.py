"""small_cnn: the built-in digits dataset's network."""

from __future__ import annotations

from torch import Tensor, nn

from bench.models.registry import register_arch


class SmallCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers for 8x8 inputs (81,002 parameters for 10 classes).

    The widths (16, 32, 32) and the 128-unit hidden layer were chosen for the CPU budget of the digits track:
    AutoAttack-plus is compute-bound on 8x8 inputs, and these widths cost ~0.5 M multiply-adds per sample
    (the earlier 32/64/64 network cost ~1.9 M) while the PGD-trained model stays clearly robust (README).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 32),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_arch(
    "small_cnn",
    description="3-conv, 2-linear CNN for 1x8x8 digits (scikit-learn load_digits); trains in seconds on CPU",
    input_shape=(1, 8, 8),
)
def small_cnn(num_classes: int) -> nn.Module:
    return SmallCNN(num_classes)
