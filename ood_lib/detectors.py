"""Detectors: score functions where HIGHER means MORE in-distribution (the convention of ``metrics``).

Logit-based detectors are pure functions of cached logits (numpy arrays of shape (N, num_classes)); they
return float64 arrays of shape (N,). ODIN needs input gradients, so it takes the model and the images.

* ``msp``       max softmax probability (Hendrycks & Gimpel, ICLR 2017).
* ``maxlogit``  largest logit (Hendrycks et al., ICML 2022, "Scaling OOD detection").
* ``energy``    T * logsumexp(f(x) / T), the negative free energy, T = 1 (Liu et al., NeurIPS 2020).
* ``odin``      max softmax of f(x~) / T with x~ = x - eps * sign(grad_x CE(f(x)/T, argmax f(x))), T = 1000,
                eps = 0.0014 on [0, 1] inputs (Liang et al., ICLR 2018; no input clipping, as in the paper's code).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ODIN_TEMPERATURE = 1000.0
ODIN_EPSILON = 0.0014
ENERGY_TEMPERATURE = 1.0


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def msp(logits) -> np.ndarray:
    """Max softmax probability: max_c softmax(f(x))_c."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(z.max(axis=1) - _logsumexp(z))


def maxlogit(logits) -> np.ndarray:
    """Largest logit: max_c f(x)_c."""
    return np.asarray(logits, dtype=np.float64).max(axis=1)


def energy(logits, temperature: float = ENERGY_TEMPERATURE) -> np.ndarray:
    """Negative free energy: T * logsumexp_c(f(x)_c / T)."""
    z = np.asarray(logits, dtype=np.float64)
    return temperature * _logsumexp(z / temperature)


def odin(model: torch.nn.Module, images: torch.Tensor, temperature: float = ODIN_TEMPERATURE,
         epsilon: float = ODIN_EPSILON, batch_size: int = 500) -> np.ndarray:
    """ODIN score of float images in [0, 1], shape (N, C, H, W), on the model's device. Model in eval mode."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32).requires_grad_(True)
        logits = model(x).float() / temperature
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            perturbed = model(x - epsilon * grad.sign()).float() / temperature
            out.append(torch.softmax(perturbed, dim=1).max(dim=1).values.double().cpu())
    return torch.cat(out).numpy()


# Logit-only detectors, by the names used in results (metrics.csv).
LOGIT_DETECTORS = {"msp": msp, "maxlogit": maxlogit, "energy": energy}

# Every detector by name: logit-only ones take logits; ``odin`` takes (model, images).
DETECTORS = {**LOGIT_DETECTORS, "odin": odin}
