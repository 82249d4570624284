"""Step caching: on denoising steps where the DiT's input changed little, reuse the block stack's residual from the
last computed step instead of running the blocks. The embeddings and the head always run.

One decision per step for the whole replica. Every rank contributes its local sums (over its real tokens and the
CFG branches it runs) to one all_gather over the replica's group, then every rank adds the same table up in rank
order and decides from the totals: the decision cannot differ between ranks, whatever the Ulysses degree or
CFG-parallel split. The same gather carries each rank's cache state (step, computed steps, skips in a row, policy,
threshold, expert); any difference is a StepCacheMismatch on every rank at once, never a rank entering a collective
the others skip.

Two-expert models (Wan2.2 T2V-A14B): a residual is never reused across experts. At the switch the cache starts a
fresh state (no residual, no statistics, no skips in a row), so the new expert's first step always computes and the
policy then decides from that expert's own steps; the warm-up and the last step stay the request's. TeaCache's
polynomials were fitted on Wan2.1's single DiT: refused for two experts (fbcache and easycache need no fit).

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
           "cache_buffers", "finite"]


@dataclass(frozen=True)
class CachePolicy:
    name: str
    threshold: float  # default; what bench/step_cache.py recommends
    warmup: float  # fraction of the steps always computed first (skipping early steps destroys motion)
    min_warmup: int  # ... and at least this many
    max_skips: int  # most steps reused in a row
    probe_blocks: int  # blocks that run every step before the decision


POLICIES: dict[str, CachePolicy] = {
    "teacache": CachePolicy("teacache", 0.08, 0.1, 1, 3, 0),
    "fbcache": CachePolicy("fbcache", 0.16, 0.2, 2, 3, 1),
    "easycache": CachePolicy("easycache", 0.3, 0.2, 2, 3, 0),
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


def finite(value: int | float) -> bool:
    """math.isfinite, False for an int beyond float range instead of OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_cache(policy: str, threshold: float | None, steps: int, dit_config: WanDiTConfig | None = None,
                experts: int = 1) -> None:
    """ValueError (one line) unless `policy` can cache a `steps`-step run of this model (None: not known here);
    experts: the model's DiTs (2 for Wan2.2 T2V-A14B's high- and low-noise experts)."""
    if policy == "off":
        return
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of off, {', '.join(POLICIES)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not finite(threshold) or not 0 < threshold <= 1):
        raise ValueError(f"cache_threshold must be a number in (0, 1], got {threshold!r:.40}")
    if policy == "teacache" and experts > 1:
        # TeaCache's polynomials were fitted on Wan2.1's single DiT; each expert's time embedding differs
        usable = ", ".join(p for p in POLICIES if p != "teacache")
        raise ValueError(f"cache teacache has no coefficients for two-expert models (Wan2.2 T2V-A14B); use {usable}")
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
    """Bytes a StepCache adds on one rank during denoising, in fp32 [L, C] tensors: what it keeps between steps
    (teacache: each branch's residual; fbcache: + each branch's block-0 residual; easycache: + the stack input at
    the last step and at the last computed step, shared by the branches), and within a step fbcache's block-0
    output per branch and one temporary of the statistics."""
    tensors = {"off": 0, "teacache": branches, "fbcache": 3 * branches + 1, "easycache": branches + 3}[policy]
    return tensors * tokens_per_rank * dim * 4


def _l1(x: torch.Tensor) -> torch.Tensor:
    """sum |x| as a float64 scalar on x's device (no abs() copy, no host sync)."""
    return torch.linalg.vector_norm(x, 1).double()


class StepCache:
    """The cache state of one request on one rank. `agree(vec)` all-gathers a float64 vector over the replica's
    group and returns the [ranks, n] table (single-rank: vec[None]); `valid` is this rank's count of real tokens;
    `branches` the number of CFG branches this rank runs per step (each keeps its own residual)."""

    def __init__(self, policy: str, threshold: float | None, steps: int, dit_config: WanDiTConfig, *,
                 branches: int, valid: int, agree: Callable[[torch.Tensor], torch.Tensor], stats_rank: bool = True,
                 experts: int = 1):
        check_cache(policy, threshold, steps, dit_config, experts)
        self.spec = POLICIES[policy]
        self.poly = None
        default = self.spec.threshold
        if policy == "teacache":
            coefficients, default = teacache_coefficients(dit_config)
            self.poly = np.poly1d(coefficients)
        self.threshold = float(threshold) if threshold is not None else default
        self.steps, self.valid, self.agree = steps, valid, agree
        self.stats_rank = stats_rank  # teacache's input is the same on every rank: only one rank reports it
        self.warmup = warmup_steps(self.spec, steps)
        self.computed: list[int] = []
        self.skipped: list[int] = []
        self.expert = 0  # the DiT whose residuals are kept (two-expert models switch once, at the boundary)
        self._fresh(branches)

    def _fresh(self, branches: int) -> None:
        """Forget every residual and statistic: a new DiT's blocks share nothing with the last one's, so its first
        step computes (no residual) and the policies compare against its own steps only."""
        self.branches = branches
        self.skips_in_row = 0
        self.accumulated = 0.0
        self.residual: list[torch.Tensor | None] = [None] * branches  # out - in of the skipped blocks
        self.prev_r1: list[torch.Tensor | None] = [None] * branches  # fbcache: block 0's residual, last computed
        self.prev_e: torch.Tensor | None = None  # teacache: the time embedding at the last step
        # easycache: the stack input (the same for every branch) at the last step and the last computed step
        self.prev_x: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None
        self.rate_sums: torch.Tensor | None = None  # easycache: [sum|out - out_prev|, sum|in - in_prev|, sum|out|]
        self.k: float | None = None

    @property
    def probe_blocks(self) -> int:
        return self.spec.probe_blocks

    # -- the decision ---------------------------------------------------------------------------------------------

    def _local_stats(self, inputs: Sequence[StackInput], probes: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's sums over its real tokens and its branches, float64 on the compute device: [numerator,
        denominator, easycache's rate numerator, rate denominator]."""
        n, name = self.valid, self.spec.name
        zero = torch.zeros((), dtype=torch.float64, device=inputs[0].x_BLC.device)
        num = den = rate_num = rate_den = zero
        if name == "teacache":
            if self.stats_rank and self.prev_e is not None:
                num, den = _l1(inputs[0].e_BC - self.prev_e), _l1(self.prev_e)
        elif name == "fbcache":
            for b, (s, h) in enumerate(zip(inputs, probes)):
                if self.prev_r1[b] is not None:
                    num = num + _l1((h - s.x_BLC)[:, :n] - self.prev_r1[b])
                    den = den + _l1(self.prev_r1[b])
        else:
            # Every branch sees the same input change; counted once per branch so that a CFG-parallel replica (one
            # branch per rank, twice the ranks) and a sequential one add up the same totals.
            if self.prev_x is not None:
                num = _l1(inputs[0].x_BLC[:, :n] - self.prev_x) * len(inputs)
            if self.rate_sums is not None:
                rate_num, rate_den, den = self.rate_sums.unbind()
                rate_den = rate_den * len(inputs)
        return torch.stack([num, den, rate_num, rate_den])

    def decide(self, step: int, inputs: Sequence[StackInput], probes: Sequence[torch.Tensor]) -> bool:
        """True: run the blocks this step. Collective: every rank of the replica calls it at every step."""
        stats = self._local_stats(inputs, probes)
        state = torch.tensor([step, len(self.computed), self.skips_in_row, _CODES[self.spec.name], self.threshold,
                              self.expert], dtype=torch.float64)
        rows = self.agree(torch.cat([stats, state.to(stats.device)])).tolist()  # the one host sync of a step
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
        """True to compute, from the replica's totals; sets the accumulator for a skipped step. Any statistic
        that is not a finite number computes."""
        name = self.spec.name
        if name == "easycache" and s3 > 0:
            self.k = s2 / s3
        forced = (step < self.warmup or step == self.steps - 1 or self.residual[0] is None
                  or self.skips_in_row >= self.spec.max_skips)
        if forced or not s1 > 0:
            return True
        if name == "teacache":
            intervals = _TEACACHE_FIT_STEPS / self.steps  # fitted intervals one step spans
            d = s0 / s1 / intervals
            # The polynomial is TeaCache's fit over the changes it saw; outside them it can dip below the change
            # itself or below zero: never count less than the input's own relative change.
            change = intervals * max(float(self.poly(d)), d)
        elif name == "fbcache":
            change = s0 / s1
        else:
            if self.k is None:
                return True
            change = self.k * s0 / s1
        estimate = (self.accumulated if name != "fbcache" else 0.0) + change
        if not math.isfinite(estimate) or estimate >= self.threshold:
            return True
        self.accumulated = estimate
        return False

    def _remember(self, inputs, probes, compute: bool) -> None:
        """What the next step compares against: teacache's and easycache's inputs every step, fbcache's probe
        residual only on computed steps (so slow drift accumulates against the last computed step)."""
        n, name = self.valid, self.spec.name
        if name == "teacache":
            self.prev_e = inputs[0].e_BC
        elif name == "easycache":
            self.prev_x = inputs[0].x_BLC[:, :n]
        elif compute:
            for b, (s, h) in enumerate(zip(inputs, probes)):
                self.prev_r1[b] = (h - s.x_BLC)[:, :n]

    # -- residuals ------------------------------------------------------------------------------------------------

    def _store(self, outs: Sequence[torch.Tensor], inputs: Sequence[StackInput], probes) -> None:
        """After a computed step: keep the skipped blocks' residual of each branch (and easycache's rate sums:
        how much the stack's output moved against its input since the last computed step)."""
        if self.spec.name == "easycache":
            n = self.valid
            x = inputs[0].x_BLC[:, :n]
            out_norm = sum(_l1(y[:, :n]) for y in outs)
            if self.anchor is not None:
                d_out = sum(_l1(y[:, :n] - self.anchor - r[:, :n]) for y, r in zip(outs, self.residual))
                self.rate_sums = torch.stack([d_out, _l1(x - self.anchor), out_norm])
            else:
                self.rate_sums = torch.stack([torch.zeros_like(out_norm), torch.zeros_like(out_norm), out_norm])
            self.anchor = x
        for b, (y, h) in enumerate(zip(outs, probes)):
            self.residual[b] = y - h

    def summary(self) -> dict:
        return {"policy": self.spec.name, "threshold": self.threshold, "computed_steps": len(self.computed),
                "steps": self.steps, "skipped": list(self.skipped)}

    def use_expert(self, expert: int, branches: int) -> None:
        """Step with DiT `expert` from now on (the index in Components.experts()); a different one than the last
        step's starts from a fresh state, so no residual is ever reused across experts. `branches`: the CFG branches
        this rank runs for it (an expert whose guidance is 1.0 runs the conditional pass only)."""
        if expert != self.expert:
            self.expert = expert
            self._fresh(branches)

    # -- one step of the model --------------------------------------------------------------------------------------

    def velocities(self, dit: WanDiT, step: int, x_BLP: torch.Tensor, grid, t_B: torch.Tensor,
                   contexts: Sequence[torch.Tensor], expert: int = 0) -> list[torch.Tensor]:
        """The velocity of each CFG branch this rank runs (contexts[b] is branch b's text), reusing the residuals
        when the replica decides so. expert: which of the model's DiTs `dit` is (see use_expert)."""
        self.use_expert(expert, len(contexts))
        assert len(contexts) == self.branches, (len(contexts), self.branches)
        tokens_BLC = dit.embed_tokens(x_BLP)  # shared by the branches: the patch embedding reads no text
        inputs = [dit.embed(x_BLP, grid, t_B, ctx, tokens_BLC) for ctx in contexts]
        probes = [dit.run_blocks(s, s.x_BLC, 0, self.probe_blocks) for s in inputs]
        if self.decide(step, inputs, probes):
            outs = [dit.run_blocks(s, h, self.probe_blocks) for s, h in zip(inputs, probes)]
            self._store(outs, inputs, probes)
        else:
            outs = [h + r for h, r in zip(probes, self.residual)]
        return [dit.head_out(s, y) for s, y in zip(inputs, outs)]
