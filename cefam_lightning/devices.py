"""Parsing a ``--device`` argument, shared by the commands."""

from __future__ import annotations

import torch


def select_device(device: str | torch.device, error: type[Exception] = ValueError) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a device.

    An unknown name, or CUDA asked for where there is none, raises ``error`` (the calling command's error type).
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise error(f"unknown device {device!r}; choose auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} requested, but CUDA is not available here (use --device cpu)")
    return dev
