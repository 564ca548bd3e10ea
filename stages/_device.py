"""The device a model runs on, checked before anything is loaded.

Apart from ``stages._load`` so that the training stage, which needs only this, does not depend
on the model-loading code.
"""

from __future__ import annotations

import logging

from stages.params import ConfigError, StageParams

log = logging.getLogger("stages")


def resolve_device(device: str, key: str) -> str:
    """``auto`` -> cuda when one GPU is visible, ``auto`` (the model spread over all of them,
    ``ModelAdapter.load``) when several are, else cpu (logged); ``cuda[:N]`` without CUDA is a
    ConfigError naming ``key``."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if count > 1:
                log.info("%s: auto -> spread over %d GPUs (%s, ...)", key, count, torch.cuda.get_device_name(0))
                return "auto"
            log.info("%s: auto -> cuda (%s)", key, torch.cuda.get_device_name(0))
            return "cuda"
        log.info("%s: auto -> cpu (torch sees no CUDA device)", key)
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {device!r} but torch sees no CUDA device on this machine; use 'cpu' or 'auto'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: 'mps' but torch sees no MPS device on this machine; use 'cpu' or 'auto'")
    return device


def model_device(params: StageParams, name: str) -> str:
    """The device model ``name`` runs on, resolved (``models.<name>.device``)."""
    return resolve_device(params.models[name].device, f"models.{name}.device")
