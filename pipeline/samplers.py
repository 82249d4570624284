"""Flow-matching samplers: x_t = (1 - s) x0 + s eps, the model predicts v = eps - x0.

Both reproduce diffusers' schedulers step for step (same sigma grids, same float32 coefficient arithmetic):
UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift) with Wan's
settings (order 2, bh2, predict x0, lower order final, final sigma 0), and FlowMatchEulerDiscreteScheduler(shift).
Every update is elementwise, so a rank can step its own token shard of the latents.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["UniPCSampler", "EulerSampler", "make_sampler", "shift_sigmas"]

TRAIN_STEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class EulerSampler:
    """First-order flow-matching Euler: x_next = x + (s_next - s) v."""

    def __init__(self, steps: int, shift: float):
        sigma_min = float(shift_sigmas(np.float32(1 / TRAIN_STEPS), shift))  # diffusers' shifted schedule floor
        grid = np.linspace(TRAIN_STEPS, sigma_min * TRAIN_STEPS, steps) / TRAIN_STEPS
        sigmas = torch.from_numpy(shift_sigmas(grid, shift)).to(torch.float32)
        self.timesteps = sigmas * TRAIN_STEPS
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])

    def step(self, i: int, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.to(torch.float32) + dt * velocity).to(velocity.dtype)


class UniPCSampler:
    """UniPC multistep (order 2, B(h) = e^h - 1, data prediction) with the UniC corrector, on flow sigmas."""

    order = 2

    def __init__(self, steps: int, shift: float):
        sigmas = shift_sigmas(np.linspace(1, 1 / TRAIN_STEPS, steps + 1)[:-1], shift)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6  # keeps log(alpha) finite at the first step, as diffusers does
        self.timesteps = torch.from_numpy(sigmas * TRAIN_STEPS).to(torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._x0: list[torch.Tensor | None] = [None] * self.order  # data predictions, oldest first
        self._last_sample: torch.Tensor | None = None
        self._warm = 0  # steps taken so far, capped at order
        self._order = 1

    def _lambda(self, i: int) -> torch.Tensor:
        sigma = self.sigmas[i]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _coefficients(self, s0: int, t: int, order: int, corrector: bool):
        """h, h*phi_1(-h) and B(h) from step s0 to t, and the rho weights for `order` (None when order is 1)."""
        h = self._lambda(t) - self._lambda(s0)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        rks = []
        if order == 2:
            si = s0 - 1
            rks.append((self._lambda(si) - self._lambda(s0)) / h)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        R, b = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(R), torch.stack(b)
        if corrector:
            rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(R, b)
        else:
            rhos = torch.ones(1) * 0.5 if order == 2 else None
        return h_phi_1, b_h, rks, rhos

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP: from sample x at sigma_i to sigma_{i+1}."""
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        m0 = self._x0[-1]
        h_phi_1, b_h, rks, rhos = self._coefficients(i, i + 1, order, corrector=False)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            d1 = (self._x0[-2] - m0) / rks[0]
            x_t = x_t - alpha_t * b_h * (rhos[0] * d1)
        return x_t.to(x.dtype)

    def _correct(self, x0_now: torch.Tensor, x_prev: torch.Tensor, x_now: torch.Tensor, i: int, order: int):
        """UniC: redo the step that produced x_now (sigma_{i-1} -> sigma_i) with the new data prediction."""
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        m0 = self._x0[-1]
        h_phi_1, b_h, rks, rhos = self._coefficients(i - 1, i, order, corrector=True)
        x_t = sigma_t / sigma_s0 * x_prev - alpha_t * h_phi_1 * m0
        corr = rhos[0] * ((self._x0[-2] - m0) / rks[0]) if order == 2 else 0
        x_t = x_t - alpha_t * b_h * (corr + rhos[-1] * (x0_now - m0))
        return x_t.to(x_now.dtype)

    def step(self, i: int, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Given the model's velocity at (x, sigmas[i]), the sample at sigmas[i+1]. Call with i = 0, 1, 2, ..."""
        x0 = x - self.sigmas[i] * velocity
        if i > 0 and self._last_sample is not None:
            x = self._correct(x0, self._last_sample, x, i, self._order)
        self._x0 = self._x0[1:] + [x0]
        steps = len(self.timesteps)
        self._order = min(self.order, steps - i, self._warm + 1)  # lower order at the start and the end
        self._last_sample = x
        x_next = self._predict(x, i, self._order)
        self._warm = min(self._warm + 1, self.order)
        return x_next


def make_sampler(name: str, steps: int, shift: float):
    if name == "unipc":
        return UniPCSampler(steps, shift)
    if name == "euler":
        return EulerSampler(steps, shift)
    raise ValueError(f"unknown sampler {name!r}; available: unipc, euler")
