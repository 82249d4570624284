"""Samplers against diffusers' schedulers fed the same samples and model outputs."""

from __future__ import annotations

import pytest
import torch

from pipeline.samplers import EulerSampler, UniPCSampler, make_sampler


def diffusers_scheduler(name, shift):
    if name == "unipc":
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000, solver_order=2, solver_type="bh2",
                                       predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)


@pytest.mark.parametrize("name", ["unipc", "euler"])
@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 1.0), (5, 3.0), (20, 5.0), (50, 5.0), (13, 8.0)])
def test_matches_diffusers(name, steps, shift):
    ref = diffusers_scheduler(name, shift)
    ref.set_timesteps(steps)
    ours = make_sampler(name, steps, shift)
    assert torch.equal(ours.sigmas, ref.sigmas.float())
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    g = torch.Generator().manual_seed(steps)
    x_ref = x_ours = torch.randn(1, 16, 3, 4, 4, generator=g)
    for i, t in enumerate(ref.timesteps):
        # A fake model whose output depends on the sample, as a real one does.
        v_ref = torch.tanh(x_ref) + 0.1 * torch.randn(x_ref.shape, generator=g)
        v_ours = torch.tanh(x_ours) + (v_ref - torch.tanh(x_ref))
        x_ref = ref.step(v_ref, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(i, v_ours, x_ours)
        assert torch.equal(x_ours, x_ref), (i, (x_ours - x_ref).abs().max())


def test_flow_matching_recovers_data_with_exact_velocity():
    """With the true velocity of a single data point, every sampler lands on it."""
    x0 = torch.randn(1, 4, 2, 2)
    eps = torch.randn_like(x0)
    for sampler in (UniPCSampler(10, 5.0), EulerSampler(10, 5.0)):
        x = (1 - sampler.sigmas[0]) * x0 + sampler.sigmas[0] * eps
        for i in range(len(sampler.timesteps)):
            x = sampler.step(i, eps - x0, x)
        assert (x - x0).abs().max() < 1e-4


def test_elementwise_so_shards_step_alone():
    """Stepping two halves of the tokens separately equals stepping the whole."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 10, 64, generator=g)
    whole, left, right = UniPCSampler(6, 5.0), UniPCSampler(6, 5.0), UniPCSampler(6, 5.0)
    xa, xb = x[:, :4], x[:, 4:]
    for i in range(6):
        v = torch.randn(x.shape, generator=g)
        x = whole.step(i, v, x)
        xa, xb = left.step(i, v[:, :4], xa), right.step(i, v[:, 4:], xb)
    assert torch.equal(torch.cat([xa, xb], 1), x)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        make_sampler("ddim", 10, 1.0)
