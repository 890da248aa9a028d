"""The small CNN that plays the frozen classifier in the shapes world (docs/method.md#shapes-classifier)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ShapesCNN(nn.Module):
    """Four stages named like a ResNet's (``layer1..layer4``), then global average pooling and ``fc``.

    ``layer1`` runs at full resolution and each later stage halves it (64 px: 64, 32, 16, 8), so the
    activation maps stay fine enough to localize objects.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ShapesCNN needs 4 stage widths, got {list(widths)}")
        w1, w2, w3, w4 = widths
        self.layer1 = nn.Sequential(*_conv_bn_relu(3, w1))
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(w1, w2))
        self.layer3 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(w2, w3), *_conv_bn_relu(w3, w3))
        self.layer4 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(w3, w4), *_conv_bn_relu(w4, w4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
