"""Small models shared by the criterion tests."""

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        )
        self.classifier = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))
