"""Ulysses sequence-parallel attention: trade sequence sharding for head sharding with all-to-all.

Legend: B batch, L local tokens (one rank's slice), S = P*L gathered tokens, T joint tokens, H heads, h heads of one
rank (or of one chunk of them), D head dim, P group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import FP8Codec, HeadLayout, HeadToSeq, NativeCodec, SeqToHead, plan_fuse
from .local import local_attention
from .ring import SIGNATURE_FIELDS, agree, check_inputs, comm_device, group_info, ring_pass, signature

__all__ = ["ulysses_attention"]

_OPTION_FIELDS = ("fuse_qkv", "fp8_comm", "head_chunks")


def _check_options(fuse_qkv, fp8_comm, head_chunks) -> None:
    if fuse_qkv not in (True, False, "auto"):
        raise ValueError(f"ulysses_attention: fuse_qkv must be True, False or 'auto', got {fuse_qkv!r}")
    if not isinstance(fp8_comm, bool):
        raise ValueError(f"ulysses_attention: fp8_comm must be a bool, got {fp8_comm!r}")
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks < 1:
        raise ValueError(f"ulysses_attention: head_chunks must be an int >= 1, got {head_chunks!r}")


def _validate(group, P, rank, ring, q, k, v, fuse_qkv, fp8_comm, head_chunks, seq_len, joint, joint_first, backend):
    """Local checks, then one all_gather of a signature per group so that a mismatch is a ValueError on every rank.

    With a ring group the ring compares first (with each rank's Ulysses index, which must be the same along a
    ring), then the Ulysses group (with the ring index, the same within a Ulysses group, and whether the ring
    agreed): any rank's error or any mismatch anywhere in the P x R mesh reaches every rank."""
    who = "ulysses_attention"
    R = 1 if ring is None else ring[1]
    error, sig = None, None
    try:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"{who}: q must be a [B, S_local, H, D] tensor")
        check_inputs(q, k, v, joint, joint_first, seq_len, R * P * q.shape[1], backend, who)
        _check_options(fuse_qkv, fp8_comm, head_chunks)
        sig = signature(q, seq_len, R * P * q.shape[1], joint, joint_first) + [
            {True: 1, False: 0, "auto": 2}[fuse_qkv], int(fp8_comm), head_chunks]
    except ValueError as e:
        error = e
    fields = SIGNATURE_FIELDS + _OPTION_FIELDS
    if ring is not None and R > 1:
        mine = None if sig is None else sig + [P, rank]
        mismatch = agree(ring[0], R, mine, fields + ("Ulysses size", "Ulysses index"), f"{who} (ring group)", q)
        error = error or mismatch
        if mismatch is not None:
            sig = None  # tell the Ulysses group too, so the other rings hear of it
    if P > 1:
        mine = None if sig is None else sig + [R, 0 if ring is None else ring[2]]
        mismatch = agree(group, P, mine, fields + ("ring size", "ring index"), who, q)
        error = error or mismatch
    if error is not None:
        raise error


def _attend(q, k, v, seq_len, joint, joint_first, backend, ring=None):
    """Attention over the gathered sequence [B, S, h, D] (keys past seq_len dropped) and optional joint tokens;
    with ring = (ring group, R, ring index) that sequence is ring block i of R and the ring attends the rest.
    Returns (sequence output [B, S, h, D], joint output [B, T, h, D] or None)."""
    if ring is not None:
        return ring_pass(q, k, v, *ring, seq_len, joint, joint_first, backend)
    if joint is None:
        return local_attention(q, k, v, backend=backend, kv_len=seq_len), None
    jq, jk, jv = joint
    T = jq.shape[1]
    k, v = k[:, :seq_len], v[:, :seq_len]
    if joint_first:
        out = local_attention(torch.cat([jq, q], 1), torch.cat([jk, k], 1), torch.cat([jv, v], 1), backend=backend)
        return out[:, T:], out[:, :T]
    out = local_attention(torch.cat([q, jq], 1), torch.cat([k, jk], 1), torch.cat([v, jv], 1), backend=backend)
    return out[:, :-T], out[:, -T:]


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    fuse_qkv: bool | str = "auto",
    fp8_comm: bool = False,
    head_chunks: int = 1,
    seq_len: int | None = None,
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_first: bool = False,
    backend: str = "auto",
    validate: bool = True,
    ring_group=None,
):
    """Self-attention over a sequence sharded across `group`: q, k, v ``[B, S_local, H, D]`` -> ``[B, S_local, H, D]``.

    Rank r holds global tokens r*S_local .. (r+1)*S_local-1; every rank passes the same S_local. Rank r attends
    for H//P heads (one more if r < H%P), so the head count need not divide the group size.

    seq_len: real tokens in the global sequence; keys at or past it are padding and never attended to.
    fuse_qkv: True sends Q, K, V in one all-to-all; False in three concurrent ones; "auto" measures both once per
        group and message size and keeps the faster (all ranks agree). The results are bit-for-bit identical.
    fp8_comm: both all-to-alls carry float8 e4m3 with one fp32 scale (amax/448) per (token, head) vector, payload
        and scale in one uint8 buffer. Each element is off by at most 2^-4 of itself and at most amax/28 of its
        vector. Measured on random N(0, 1) q, k, v (D = 16..128, 32..1024 tokens, fp32 and bf16): the attention
        output's relative L2 error vs unquantised attention is 4.5-5.3%, its max abs error <= 0.19 (0.035 at
        1024 tokens: it falls with sequence length). Use it where bandwidth, not accuracy, is the limit.
    head_chunks: this rank's heads are attended in that many chunks; chunk i+1's all-to-all is in flight while chunk
        i is attended, and each chunk's output starts back as soon as it is done.
    joint: (jq, jk, jv) ``[B, T, H, D]``, the same on every rank (e.g. text tokens), attended together with the whole
        sequence, before it if joint_first; then the result is (out, joint_out) with joint_out ``[B, T, H, D]``,
        identical on every rank.
    validate: check inputs on every rank and compare them across ranks (one small all_gather) before the first
        collective, so a mismatch is a ValueError everywhere instead of a hang. Callers that have validated
        identical shapes already (e.g. layers after the first in a model forward) may pass False.
    ring_group: Ulysses x Ring (USP). The all-to-all runs inside `group` (U ranks, e.g. one node) and
        `ring_attention` across `ring_group` (R ranks, e.g. one per node) on the head-sharded, sequence-gathered
        tensors. The rank with ring index i and Ulysses index j holds global token block i*U + j, so after the
        all-to-all ring rank i holds blocks i*U .. i*U+U-1 (ring block i) for its heads. seq_len counts the
        whole R*U*S_local sequence (its padding lies in the last ring blocks; all-padding blocks skip the ring);
        head_chunks runs one ring pass per chunk (chunk i+1's all-to-all in flight meanwhile); fp8_comm applies
        to the all-to-alls only (the ring carries K/V in their own dtype). Uneven heads work as without a ring.
    """
    who = "ulysses_attention"
    group, P, rank = group_info(group, who)
    ring = None
    if ring_group is not None:
        ring_group, R, ring_rank = group_info(ring_group, who)
        ring = (ring_group, R, ring_rank)
    if validate:
        _validate(group, P, rank, ring, q, k, v, fuse_qkv, fp8_comm, head_chunks, seq_len, joint, joint_first,
                  backend)
    B, L, H, D = q.shape
    seq_len = seq_len or (1 if ring is None else ring[1]) * P * L
    if P == 1:
        out, joint_out = _attend(q, k, v, seq_len, joint, joint_first, backend, ring)
        out = out.to(q.dtype)
        return out if joint is None else (out, joint_out.contiguous())

    layout = HeadLayout(H, P, head_chunks)
    codec = FP8Codec() if fp8_comm else NativeCodec()
    if fuse_qkv == "auto":
        fuse_qkv = plan_fuse(group, layout, rank, codec, q, comm_device(group, q))
    to_heads = SeqToHead(layout, rank, codec, fuse_qkv, group)
    to_seq = HeadToSeq(layout, rank, codec, group)
    chunks = layout.live_chunks()

    # Post every input all-to-all up front: chunk i+1's is on the wire while chunk i is attended.
    inbound = {c: to_heads.start((q, k, v), c) for c in chunks}
    outbound = {}
    my_heads = slice(layout.offsets[rank], layout.offsets[rank] + layout.counts[rank])
    joint_mine = None if joint is None else q.new_empty((B, joint[0].shape[1], layout.counts[rank], D))
    for c in chunks:
        qc, kc, vc = to_heads.finish(inbound.pop(c), q, c)
        start, h = layout.chunk(rank, c)
        if h:
            jc = None if joint is None else tuple(t[:, :, start : start + h] for t in joint)
            out_c, joint_c = _attend(qc, kc, vc, seq_len, jc, joint_first, backend, ring)
            if joint_c is not None:
                joint_mine[:, :, start - my_heads.start : start - my_heads.start + h] = joint_c
        else:  # this rank owns no head in this chunk but still takes part in the exchange
            out_c = q.new_empty((B, P * L, 0, D))
        outbound[c] = to_seq.start(out_c, c)

    out = q.new_empty((B, L, H, D))
    for c in chunks:
        to_seq.finish(outbound.pop(c), out, c)
    if joint is None:
        return out
    return out, _gather_heads(joint_mine, layout, group)


def _gather_heads(x_BThD: torch.Tensor, layout: HeadLayout, group) -> torch.Tensor:
    """All ranks' heads of the joint output -> [B, T, H, D] on every rank (uneven head counts padded for the wire)."""
    B, T, _, D = x_BThD.shape
    h_max = max(layout.counts)
    send = x_BThD.new_zeros((B, T, h_max, D))
    send[:, :, : x_BThD.shape[2]] = x_BThD
    recv = [torch.empty_like(send) for _ in range(layout.world)]
    dist.all_gather(recv, send, group=group)
    return torch.cat([r[:, :, :n] for r, n in zip(recv, layout.counts)], dim=2)
