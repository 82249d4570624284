"""Step caching: on denoising steps where the DiT's input changed little, reuse the block stack's residual from the
last computed step instead of running the blocks. The embeddings and the head always run.

One decision per step for the whole replica. Every rank contributes its local sums (over its real tokens and the
CFG branches it runs) to one all_gather over the replica's group, then every rank adds the same table up in rank
order and decides from the totals: the decision cannot differ between ranks, whatever the Ulysses degree or
CFG-parallel split. The same gather carries each rank's cache state (step, computed steps, skips in a row, policy,
threshold); any difference is a StepCacheMismatch on every rank at once, never a rank entering a collective the
others skip.

Policies (sources: TeaCache4Wan2.1, ParaAttention's first-block cache, EasyCache4Wan2.1; ../docs/benchmarks.md):
- teacache: accumulated relative L1 change of the time embedding `e`, rescaled by TeaCache's degree-4 polynomial
  fitted for that model at 50 steps. At N steps one interval spans 50/N fitted intervals, so the change is rescaled
  as (50/N) * poly(d * N/50). Wan's time embedding depends only on t: the schedule is content-independent.
- fbcache: block 0 runs every step; when its residual changed by less than the threshold (relative L1 against the
  last computed step's), the other blocks are skipped and their cached residual added.
- easycache: EasyCache's transformation rate k = |delta out| / |delta in| of the block stack between the last two
  computed steps; accumulates k * |delta in| / |out| per step, where `in` is the stack's input (the embedded
  latents), so deciding costs no block at all.

Legend: B batch (1), L this rank's tokens (the tail of the last rank's shard is padding), C model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .dit import StackInput, WanDiT, WanDiTConfig

__all__ = ["POLICIES", "CachePolicy", "StepCache", "StepCacheMismatch", "check_cache", "teacache_coefficients",
           "cache_buffers"]


@dataclass(frozen=True)
class CachePolicy:
    name: str
    threshold: float  # default; what bench/step_cache.py recommends
    warmup: float  # fraction of the steps always computed first (skipping early steps destroys motion)
    min_warmup: int  # ... and at least this many
    max_skips: int  # most steps reused in a row
    probe_blocks: int  # blocks that run every step before the decision


POLICIES: dict[str, CachePolicy] = {
    "teacache": CachePolicy("teacache", 0.08, 0.0, 1, 3, 0),
    "fbcache": CachePolicy("fbcache", 0.08, 0.2, 2, 3, 1),
    "easycache": CachePolicy("easycache", 0.05, 0.2, 2, 3, 0),
}

# TeaCache's polynomials (highest power first), input `e` ("no ret-steps"), keyed by the DiT's width: the time
# embedding's shape. Default thresholds: TeaCache4Wan2.1's recommended commands.
_TEACACHE = {
    (1536, 12, 8960): ((2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1), 0.08),  # 1.3B
    (5120, 40, 13824): ((-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404), 0.2),  # 14B
}
_TEACACHE_FIT_STEPS = 50
_CODES = {name: i + 1 for i, name in enumerate(POLICIES)}


class StepCacheMismatch(RuntimeError):
    """Ranks of one replica reached a step cache decision with different states: raised on every rank at once."""


def teacache_coefficients(dit_config: WanDiTConfig) -> tuple[tuple[float, ...], float] | None:
    """(polynomial, default threshold) for a Wan2.1 DiT TeaCache was fitted on, else None."""
    return _TEACACHE.get((dit_config.dim, dit_config.num_heads, dit_config.ffn_dim))


def warmup_steps(policy: CachePolicy, steps: int) -> int:
    return max(policy.min_warmup, math.ceil(policy.warmup * steps))


def check_cache(policy: str, threshold: float | None, steps: int, dit_config: WanDiTConfig | None = None) -> None:
    """ValueError (one line) unless `policy` can cache a `steps`-step run of this model (None: not known here)."""
    if policy == "off":
        return
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of off, {', '.join(POLICIES)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold) or threshold <= 0):
        raise ValueError(f"cache_threshold must be a number > 0, got {threshold!r:.40}")
    spec = POLICIES[policy]
    forced = warmup_steps(spec, steps) + 1  # the warm-up and the last step
    if steps <= forced:
        raise ValueError(f"cache {policy} cannot skip anything in {steps} steps (it always computes the first "
                         f"{forced - 1} and the last): use at least {forced + 1} steps or cache off")
    if dit_config is None:
        return
    if policy == "teacache" and teacache_coefficients(dit_config) is None:
        usable = ", ".join(p for p in POLICIES if p != "teacache")
        raise ValueError(f"cache teacache has coefficients only for Wan2.1 1.3B and 14B, not this model "
                         f"(dim {dit_config.dim}); use {usable}")
    if spec.probe_blocks >= dit_config.num_layers:
        raise ValueError(f"cache {policy} needs more than {spec.probe_blocks} DiT block(s); this model has "
                         f"{dit_config.num_layers}")


def cache_buffers(policy: str, tokens_per_rank: int, dim: int, branches: int) -> int:
    """Bytes a StepCache adds on one rank during denoising, fp32 [L, C] tensors per branch: what it keeps between
    steps (teacache: the residual; fbcache: + block 0's residual; easycache: + two stack inputs) and, during a
    step, every branch's embedded tokens (and fbcache's block-0 output) held at once while the replica decides."""
    per_branch = {"off": 0, "teacache": 2, "fbcache": 4, "easycache": 4}[policy]
    return per_branch * branches * tokens_per_rank * dim * 4


def _abs_sum(x: torch.Tensor) -> float:
    return float(x.abs().sum(dtype=torch.float64))


class StepCache:
    """The cache state of one request on one rank. `agree(vec)` all-gathers a float64 vector over the replica's
    group and returns the [ranks, n] table (single-rank: vec[None]); `valid` is this rank's count of real tokens;
    `branches` the number of CFG branches this rank runs per step (each keeps its own residuals)."""

    _STATE = 5  # step, computed, skips in a row, policy code, threshold

    def __init__(self, policy: str, threshold: float | None, steps: int, dit_config: WanDiTConfig, *,
                 branches: int, valid: int, agree: Callable[[torch.Tensor], torch.Tensor], stats_rank: bool = True):
        check_cache(policy, threshold, steps, dit_config)
        self.spec = POLICIES[policy]
        self.poly = None
        default = self.spec.threshold
        if policy == "teacache":
            coefficients, default = teacache_coefficients(dit_config)
            self.poly = np.poly1d(coefficients)
        self.threshold = float(threshold) if threshold is not None else default
        self.steps, self.branches, self.valid, self.agree = steps, branches, valid, agree
        self.stats_rank = stats_rank  # teacache's input is the same on every rank: only one rank reports it
        self.warmup = warmup_steps(self.spec, steps)
        self.computed: list[int] = []
        self.skipped: list[int] = []
        self.skips_in_row = 0
        self.accumulated = 0.0
        self.residual: list[torch.Tensor | None] = [None] * branches  # out - in of the skipped blocks
        self.prev: list[torch.Tensor | None] = [None] * branches  # teacache: e; fbcache: r1; easycache: stack input
        self.anchor: list[torch.Tensor | None] = [None] * branches  # easycache: stack input at the last computed step
        self.k_sums = (0.0, 0.0)  # easycache: |out - out_prev|, |in - in_prev| between the last two computed steps
        self.k: float | None = None
        self.out_norm = 0.0  # easycache: |out| at the last computed step

    @property
    def probe_blocks(self) -> int:
        return self.spec.probe_blocks

    # -- the decision ---------------------------------------------------------------------------------------------

    def _local_stats(self, inputs: Sequence[StackInput], probes: Sequence[torch.Tensor]) -> list[float]:
        n = self.valid
        name = self.spec.name
        if name == "teacache":
            if not self.stats_rank or self.prev[0] is None:
                return [0.0, 0.0, 0.0, 0.0]
            e = inputs[0].e_BC
            return [_abs_sum(e - self.prev[0]), _abs_sum(self.prev[0]), 0.0, 0.0]
        if name == "fbcache":
            num = den = 0.0
            for b, (s, h) in enumerate(zip(inputs, probes)):
                if self.prev[b] is not None:
                    r1 = (h - s.x_BLC)[:, :n]
                    num, den = num + _abs_sum(r1 - self.prev[b]), den + _abs_sum(self.prev[b])
            return [num, den, 0.0, 0.0]
        num = 0.0
        for b, s in enumerate(inputs):
            if self.prev[b] is not None:
                num += _abs_sum(s.x_BLC[:, :n] - self.prev[b])
        return [num, self.out_norm, *self.k_sums]

    def decide(self, step: int, inputs: Sequence[StackInput], probes: Sequence[torch.Tensor]) -> bool:
        """True: run the blocks this step. Collective: every rank of the replica calls it at every step."""
        state = [step, len(self.computed), self.skips_in_row, _CODES[self.spec.name], self.threshold]
        table = self.agree(torch.tensor(self._local_stats(inputs, probes) + state, dtype=torch.float64))
        rows = table.tolist()
        if any(row[4:] != rows[0][4:] for row in rows):
            raise StepCacheMismatch(f"step cache states differ across the replica's ranks at step {step}: "
                                    f"{[row[4:] for row in rows]}")
        # Python floats summed in rank order: the same bits on every rank
        s0, s1, s2, s3 = (sum(row[j] for row in rows) for j in range(4))
        compute = self._rule(step, s0, s1, s2, s3)
        self._remember(inputs, probes, compute)
        if compute:
            self.computed.append(step)
            self.skips_in_row, self.accumulated = 0, 0.0
        else:
            self.skipped.append(step)
            self.skips_in_row += 1
        return compute

    def _rule(self, step: int, s0: float, s1: float, s2: float, s3: float) -> bool:
        """True to compute, from the replica's totals; sets the accumulator for a skipped step."""
        forced = (step < self.warmup or step == self.steps - 1 or self.residual[0] is None
                  or self.skips_in_row >= self.spec.max_skips)
        name = self.spec.name
        if name == "teacache":
            if s1 <= 0:
                return True
            ratio = _TEACACHE_FIT_STEPS / self.steps  # fitted intervals per step
            change = max(0.0, ratio * float(self.poly(s0 / s1 / ratio)))
            estimate = self.accumulated + change
        elif name == "fbcache":
            if s1 <= 0:
                return True
            estimate = s0 / s1
        else:
            if s3 > 0:
                self.k = s2 / s3
            if self.k is None or s1 <= 0:
                return True
            estimate = self.accumulated + self.k * s0 / s1
        if forced or not math.isfinite(estimate) or estimate >= self.threshold:
            return True
        self.accumulated = estimate
        return False

    def _remember(self, inputs, probes, compute: bool) -> None:
        """What the next step compares against: teacache's and easycache's inputs every step, fbcache's probe
        residual only on computed steps (so slow drift accumulates against the last computed step)."""
        n = self.valid
        name = self.spec.name
        for b, s in enumerate(inputs):
            if name == "teacache":
                self.prev[b] = s.e_BC.clone()
            elif name == "fbcache" and compute:
                self.prev[b] = (probes[b] - s.x_BLC)[:, :n].clone()
            elif name == "easycache":
                self.prev[b] = s.x_BLC[:, :n].clone()

    # -- residuals ------------------------------------------------------------------------------------------------

    def store(self, branch: int, s: StackInput, probe: torch.Tensor, out: torch.Tensor) -> None:
        """After a computed step: keep the skipped blocks' residual (and easycache's rate statistics)."""
        if self.spec.name == "easycache":
            n = self.valid
            x, y = s.x_BLC[:, :n], out[:, :n]
            if branch == 0:
                self.k_sums, self.out_norm = (0.0, 0.0), 0.0
            if self.anchor[branch] is not None:
                y_prev = self.anchor[branch] + self.residual[branch][:, :n]
                d_out, d_in = self.k_sums
                self.k_sums = (d_out + _abs_sum(y - y_prev), d_in + _abs_sum(x - self.anchor[branch]))
            self.out_norm += _abs_sum(y)
            self.anchor[branch] = x.clone()
        self.residual[branch] = out - probe

    def reuse(self, branch: int, probe: torch.Tensor) -> torch.Tensor:
        return probe + self.residual[branch]

    def summary(self) -> dict:
        return {"policy": self.spec.name, "threshold": self.threshold, "computed_steps": len(self.computed),
                "steps": self.steps, "skipped": list(self.skipped)}

    # -- one step of the model --------------------------------------------------------------------------------------

    def velocities(self, dit: WanDiT, step: int, x_BLP: torch.Tensor, grid, t_B: torch.Tensor,
                   contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The velocity of each CFG branch this rank runs (contexts[b] is branch b's text), reusing the residual
        when the replica decides so."""
        assert len(contexts) == self.branches, (len(contexts), self.branches)
        inputs = [dit.embed(x_BLP, grid, t_B, ctx) for ctx in contexts]
        probes = [dit.run_blocks(s, s.x_BLC, 0, self.probe_blocks) for s in inputs]
        compute = self.decide(step, inputs, probes)
        out = []
        for b, (s, h) in enumerate(zip(inputs, probes)):
            if compute:
                y = dit.run_blocks(s, h, self.probe_blocks)
                self.store(b, s, h, y)
            else:
                y = self.reuse(b, h)
            out.append(dit.head_out(s, y))
        return out
