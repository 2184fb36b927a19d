"""The GraSP code's initialization (``models/base/init_utils.py`` ``weights_init``), shared by its models."""

from __future__ import annotations

from torch import nn


def grasp_init_(model: nn.Module) -> nn.Module:
    """Conv kaiming-normal (fan_out, ReLU) and zero bias; Linear N(0, 0.01) and zero bias; BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
