"""Samplers against diffusers' schedulers fed the same samples and model outputs."""

from __future__ import annotations

import dataclasses

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


# -- classifier-free guidance: the formula itself, against numbers worked out by hand -----------------------------


def test_cfg_combine_is_uncond_plus_scale_times_the_difference():
    from pipeline.runner import cfg_combine, guided_velocity

    v_cond, v_uncond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 2.0])
    assert torch.equal(cfg_combine(v_cond, v_uncond, 5.0), torch.tensor([11.0, -13.0]))  # 1 + 5*(3-1), 2 + 5*(-3)
    assert torch.equal(cfg_combine(v_cond, v_uncond, 1.0), v_cond)
    assert torch.equal(cfg_combine(v_cond, v_uncond, 0.0), v_uncond)

    class Dit:  # the velocity is the context's value: which pass is which is visible in the result
        def forward_tokens(self, x, grid, t, context):
            return x + context

    v = guided_velocity(Dit(), torch.zeros(2), None, None, torch.tensor(3.0), torch.tensor(1.0), 5.0)
    assert torch.equal(v, torch.full((2,), 11.0))


def test_runner_guidance_is_affine_in_the_scale_and_anchored_by_the_unguided_pass(tmp_path_factory):
    """One Euler step: x_1 = x_0 + dsigma * v, so the final latents are affine in the velocity. With guidance off
    (scale 1.0) the Runner makes a single conditional pass and no combination: x(1) = x_0 + dsigma * v_cond.
    Guided, v(g) = v_u + g (v_c - v_u), so x(0), x(1), x(2), x(3) are equally spaced on one line: flipping the
    formula's branches, swapping the two contexts or mis-scaling the difference moves x(0), x(2) and x(3) off it."""
    from configs import load_config
    from pipeline.launcher import LocalLauncher
    from pipeline.request import GenerateRequest
    from tests.tiny_models import wan_pipeline_folder

    folder = wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")
    config = load_config(None, [f"model.path={folder}", "video.height=32", "video.width=48", "video.frames=5",
                                "sampling.sampler=euler", "sampling.steps=1", "runtime.device=cpu"])
    request = GenerateRequest("a red circle", seed=3, negative_prompt="blurry")
    with LocalLauncher(config, timeout_s=120, runner_options={"return_latents": True}) as group:
        x = {g: list(group.generate(dataclasses.replace(request, guidance_scale=g)))[-1].latents.double()
             for g in (0.0, 1.0, 5.0, 9.0)}
    step = x[1.0] - x[0.0]  # dsigma * (v_c - v_u)
    assert step.norm() > 1e-4 * x[1.0].norm(), "cond and uncond passes should differ"
    for g in (5.0, 9.0):
        err = (x[g] - (x[1.0] + (g - 1) * step)).norm() / ((g - 1) * step.norm())
        print(g, float(err))
        assert err < 1e-2, (g, err)
