"""Ring attention: every rank keeps its queries and heads; key/value blocks travel around the group point to
point, and the partial results are merged by log-sum-exp.

Legend: B batch, L local tokens (one rank's block), T joint tokens, H heads, D head dim, P group size, n valid
(non-padding) keys of a block, W D+1 (an output vector with its LSE appended).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .local import local_attention_lse, resolve_backend

__all__ = ["ring_attention"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIGNATURE_FIELDS = ("batch", "S_local", "heads", "head_dim", "dtype", "seq_len", "joint tokens", "joint_first")


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with ulysses_attention: the group, the device its collectives need, agreement across ranks


def group_info(group, who: str) -> tuple[object, int, int]:
    """(group, size, this rank's index in it); no torch.distributed means a group of one."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError(f"{who} got a process group but torch.distributed is not initialised")
        return None, 1, 0
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def comm_device(group, like) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        ok = isinstance(like, torch.Tensor) and like.is_cuda
        return like.device if ok else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group, P: int, sig: list[int] | None, fields: tuple[str, ...], who: str, like) -> ValueError | None:
    """One all_gather of every rank's signature (None: this rank rejected its inputs). Returns the ValueError that
    every rank of the group then raises alike (None when all agree), so a mismatch is an error, not a hang."""
    row = [1, *sig] if sig is not None else [0] + [-1] * len(fields)
    mine = torch.tensor(row, dtype=torch.int64, device=comm_device(group, like))
    every = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    bad = [r for r, row in enumerate(table) if row[0] != 1]
    if bad:
        return ValueError(f"{who}: rank(s) {bad} of the group rejected their inputs (see their errors)")
    for i, field in enumerate(fields, start=1):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            if field == "dtype":
                values = [str(DTYPES[x]).replace("torch.", "") for x in values]
            return ValueError(f"{who}: {field} differs across ranks: " + ", ".join(
                f"rank {r}: {x}" for r, x in enumerate(values)))
    return None


def check_inputs(q, k, v, joint, joint_first, seq_len, max_len: int, backend, who: str) -> None:
    """Everything one rank can check alone about q, k, v, joint, seq_len and backend; raises ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{who}: {name} must be a [B, S_local, H, D] tensor")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{who}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"{who}: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{who}: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if min(q.shape) < 1:
        raise ValueError(f"{who}: empty input {tuple(q.shape)}")
    if seq_len is not None and not (isinstance(seq_len, int) and not isinstance(seq_len, bool)
                                    and 1 <= seq_len <= max_len):
        raise ValueError(f"{who}: seq_len must be in 1..{max_len} (the whole sharded length), got {seq_len!r}")
    if joint is not None:
        if not (isinstance(joint, (tuple, list)) and len(joint) == 3):
            raise ValueError(f"{who}: joint must be a (q, k, v) tuple of [B, T, H, D] tensors")
        for name, t in zip(("joint q", "joint k", "joint v"), joint):
            ok = isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] >= 1
            if not ok or t.shape[0] != q.shape[0] or t.shape[2:] != q.shape[2:] or t.shape != joint[0].shape:
                raise ValueError(
                    f"{who}: {name} must be [B={q.shape[0]}, T, H={q.shape[2]}, D={q.shape[3]}] like the others, "
                    f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{who}: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if not isinstance(joint_first, bool):
        raise ValueError(f"{who}: joint_first must be a bool, got {joint_first!r}")
    resolve_backend(backend, q)


def signature(q, seq_len, max_len: int, joint, joint_first) -> list[int]:
    B, L, H, D = q.shape
    return [B, L, H, D, DTYPES.index(q.dtype), seq_len or max_len, joint[0].shape[1] if joint else 0,
            int(joint_first)]


# --------------------------------------------------------------------------------------------------------------
# The ring


class _Merge:
    """Running softmax over key blocks for queries [B, S, H, D]: output and LSE in fp32 (fp64 for fp64 inputs).

    Stable form (as yunchang and diffusers write it): with r = sigmoid(l_b - l), o <- o - r (o - o_b) and
    l <- l - logsigmoid(l - l_b), i.e. l' = log(e^l + e^l_b), o' = (e^l o + e^l_b o_b) / e^l', with no exp that
    can overflow."""

    def __init__(self):
        self.out_BSHD = self.lse_BSH = None

    def add(self, out_BSHD: torch.Tensor, lse_BHS: torch.Tensor) -> None:
        acc = lse_BHS.dtype
        lse_BSH = lse_BHS.transpose(1, 2)
        if self.out_BSHD is None:
            self.out_BSHD, self.lse_BSH = out_BSHD.to(acc, copy=True), lse_BSH.contiguous()
            return
        self.out_BSHD.sub_(torch.sigmoid(lse_BSH - self.lse_BSH).unsqueeze(-1) * (self.out_BSHD - out_BSHD))
        self.lse_BSH.sub_(F.logsigmoid(self.lse_BSH - lse_BSH))


def _cat_joint(x_BnHD: torch.Tensor | None, j_BTHD: torch.Tensor, joint_first: bool) -> torch.Tensor:
    if x_BnHD is None or x_BnHD.shape[1] == 0:
        return j_BTHD
    return torch.cat([j_BTHD, x_BnHD] if joint_first else [x_BnHD, j_BTHD], 1)


def ring_pass(q, k, v, group, P: int, rank: int, seq_len: int, joint, joint_first: bool, backend: str):
    """The ring itself, inputs already validated: q, k, v ``[B, L, H, D]`` are global block `rank` of a sequence of
    P*L tokens whose first seq_len are real. Returns (out ``[B, L, H, D]``, joint out ``[B, T, H, D]`` or None).

    At step s this rank attends block (rank - s) mod P, while sending it on to rank+1 and receiving the next one
    from rank-1 (one batch_isend_irecv, waited after the attention). Only a block's real keys travel; a block that
    is all padding is neither sent, received nor attended (every rank derives the same plan from seq_len).
    Batched P2P on gloo "can hang" (PiPPy #1130) when the two sides' ops do not pair up; here every isend meets
    its peer's irecv of the same block in the same step, and tests/test_ring.py runs it on 2, 3, 4 and 6 gloo
    ranks without a hang."""
    B, L, H, D = q.shape
    valid = [max(0, min(L, seq_len - b * L)) for b in range(P)]
    if P > 1:
        to_next = dist.get_global_rank(group, (rank + 1) % P)
        from_prev = dist.get_global_rank(group, (rank - 1) % P)
    merge = _Merge()
    local_k, local_v = k[:, : valid[rank]], v[:, : valid[rank]]
    kv_2BnHD = torch.stack((local_k, local_v)) if P > 1 and valid[rank] else None
    joint_step = 0 if joint_first else P - 1
    joint_part = None
    for step in range(P):
        b = (rank - step) % P
        works = []
        if step < P - 1:
            ops = []
            if valid[b]:
                ops.append(dist.P2POp(dist.isend, kv_2BnHD, to_next, group))
            b_next = (b - 1) % P
            incoming = None
            if valid[b_next]:
                incoming = q.new_empty((2, B, valid[b_next], H, D))
                ops.append(dist.P2POp(dist.irecv, incoming, from_prev, group))
            works = dist.batch_isend_irecv(ops) if ops else []
        if step == 0:
            blk_k, blk_v = local_k, local_v
        else:
            blk_k, blk_v = (kv_2BnHD[0], kv_2BnHD[1]) if valid[b] else (None, None)
        if joint is not None and step == joint_step:
            # The joint K/V join exactly one step, so each query attends them once.
            blk_k, blk_v = _cat_joint(blk_k, joint[1], joint_first), _cat_joint(blk_v, joint[2], joint_first)
        if blk_k is not None and blk_k.shape[1]:
            merge.add(*local_attention_lse(q, blk_k, blk_v, backend=backend))
        if joint is not None and step == 0:
            joint_part = _joint_partial(joint, local_k, local_v, rank, joint_first, backend)
        for work in works:
            work.wait()  # bounded by the group's timeout
        if step < P - 1:
            kv_2BnHD = incoming
    assert merge.out_BSHD is not None, "block 0 always holds a real key and every rank attends it"
    out = merge.out_BSHD.to(q.dtype)
    if joint is None:
        return out, None
    return out, _merge_joint(joint_part, group, P, q.dtype)


def _joint_partial(joint, local_k, local_v, rank: int, joint_first: bool, backend: str) -> torch.Tensor:
    """The joint queries against this rank's real keys, plus the joint keys on rank 0 only (attended once):
    ``[B, T, H, W]``, the output with its LSE appended, in fp32 (fp64 for fp64 inputs)."""
    jq, jk, jv = joint
    keys, values = local_k, local_v
    if rank == 0:
        keys, values = _cat_joint(local_k, jk, joint_first), _cat_joint(local_v, jv, joint_first)
    if keys.shape[1] == 0:  # all padding here: an empty softmax, weight zero in the merge
        acc = torch.float64 if jq.dtype == torch.float64 else torch.float32
        part = jq.new_zeros((*jq.shape[:3], jq.shape[3] + 1), dtype=acc)
        part[..., -1] = float("-inf")
        return part
    out_BTHD, lse_BHT = local_attention_lse(jq, keys, values, backend=backend)
    return torch.cat([out_BTHD.to(lse_BHT.dtype), lse_BHT.transpose(1, 2).unsqueeze(-1)], -1)


def _merge_joint(part_BTHW: torch.Tensor, group, P: int, dtype: torch.dtype) -> torch.Tensor:
    """All ranks' joint partials, gathered and merged in rank order: the same inputs and the same arithmetic on
    every rank, so the joint output is bit-for-bit identical everywhere."""
    if P == 1:
        parts_PBTHW = part_BTHW.unsqueeze(0)
    else:
        gathered = [torch.empty_like(part_BTHW) for _ in range(P)]
        dist.all_gather(gathered, part_BTHW, group=group)
        parts_PBTHW = torch.stack(gathered)
    lse_PBTH = parts_PBTHW[..., -1]
    weight_PBTH = torch.exp(lse_PBTH - torch.logsumexp(lse_PBTH, 0))  # exp(-inf) = 0 for an empty partial
    return (weight_PBTH.unsqueeze(-1) * parts_PBTHW[..., :-1]).sum(0).to(dtype)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    seq_len: int | None = None,
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_first: bool = False,
    backend: str = "auto",
):
    """Self-attention over a sequence sharded across `group`: q, k, v ``[B, S_local, H, D]`` -> ``[B, S_local, H, D]``.

    Rank r holds global tokens r*S_local .. (r+1)*S_local-1; every rank passes the same S_local and keeps all its
    heads (no head-count constraint). The K/V blocks go round the ring point to point: the next block is on the
    wire (dist.batch_isend_irecv) while the current one is attended. Each block's partial output is merged by
    log-sum-exp in fp32 (fp64 for fp64 inputs); the result has q's dtype.

    seq_len: real tokens in the global sequence; keys at or past it are never attended, and blocks that are all
        padding are neither sent nor attended. Padded queries get some finite output (callers drop it).
    joint: (jq, jk, jv) ``[B, T, H, D]``, the same on every rank (e.g. text tokens), attended together with the whole
        sequence (before it if joint_first); the result is then (out, joint_out), joint_out ``[B, T, H, D]``.
        The sequence queries meet the joint K/V at exactly one ring step (the first if joint_first, else the last).
        The joint queries are attended on every rank against its own real keys (rank 0 adds the joint keys, so they
        count once); the partials (output and LSE) are all-gathered and merged in rank order, the same arithmetic
        on every rank, so joint_out is bit-for-bit identical on every rank.
    Inputs are checked on every rank and compared across ranks (one small all_gather) before the first transfer,
    so a mismatch is a ValueError on every rank instead of a hang. Every wait is bounded by the group's timeout:
    on gloo a late peer raises there; on NCCL wait() does not block the host, and a transfer past the timeout is
    ended by NCCL's watchdog, which tears the process down (the replica is then rebuilt).
    """
    who = "ring_attention"
    group, P, rank = group_info(group, who)
    error, sig = None, None
    try:
        check_inputs(q, k, v, joint, joint_first, seq_len, P * q.shape[1], backend, who)
        sig = signature(q, seq_len, P * q.shape[1], joint, joint_first)
    except ValueError as e:
        error = e
    if P > 1:
        mismatch = agree(group, P, sig, SIGNATURE_FIELDS, who, q)  # on every rank, even one that failed already
        error = error or mismatch
    if error is not None:
        raise error
    out, joint_out = ring_pass(q, k, v, group, P, rank, seq_len or P * q.shape[1], joint and tuple(joint),
                               joint_first, backend)
    return out if joint is None else (out, joint_out)
