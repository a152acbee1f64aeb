from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """LeNet-style CNN: two conv-ReLU-maxpool blocks, then two fully connected layers.

    Works for any square input of side >= 8 (digits are 8x8, MNIST 28x28, CIFAR 32x32): the
    convolutions use padding 2 ("same" for 5x5) and the classifier input is made fixed-size by an
    adaptive average pool to 2x2.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
