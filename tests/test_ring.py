"""Ring attention and Ulysses x Ring on gloo ranks against a one-process fp64 softmax written out here.

Legend: B batch, S real tokens, L local tokens, N = P*L padded tokens, T joint tokens, H heads, D head dim,
P world size, U Ulysses size, R ring size.
"""

from __future__ import annotations

import itertools
import math
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from attention import local_attention_lse, ring_attention, ulysses_attention

GARBAGE = 1e3  # what padded positions hold: attending one of them would wreck the result


def reference(q, k, v, S, joint=None, joint_first=False):
    """fp64 softmax over the first S keys plus the joint keys; (seq out [B, N, H, D], joint out, seq lse)."""
    q, k, v = (t[:, :].double() for t in (q, k, v))
    keys, values = k[:, :S], v[:, :S]
    if joint is not None:
        jq, jk, jv = (t.double() for t in joint)
        keys = torch.cat([jk, keys] if joint_first else [keys, jk], 1)
        values = torch.cat([jv, values] if joint_first else [values, jv], 1)
        q = torch.cat([q, jq], 1)
    scores = torch.einsum("bshd,bthd->bhst", q, keys) / math.sqrt(q.shape[-1])
    scores = scores - scores.amax(-1, keepdim=True)
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    out = torch.einsum("bhst,bthd->bshd", weights, values)
    N = k.shape[1]
    return out[:, :N], (out[:, N:] if joint is not None else None)


def make_inputs(seed, B, N, S, H, D, T=0, dtype=torch.float32):
    """Global q, k, v [B, N, H, D] with garbage past S, and joint tokens (or None)."""
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(B, N, H, D, generator=g) for _ in range(3)]
    for t in full:
        t[:, S:] = GARBAGE
    joint = tuple(torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3)) if T else None
    return [t.to(dtype) for t in full], joint


# --------------------------------------------------------------------------------------------------------------
# Ulysses x Ring meshes inside the pool: Ulysses groups consecutive ranks, rings strided by U


_MESHES: dict = {}


def mesh(U):
    """(Ulysses group, ring group) of this rank for Ulysses size U; every rank creates every group, in order."""
    world = dist.get_world_size()
    if U not in _MESHES:
        R = world // U
        ulysses = [dist.new_group(list(range(i * U, (i + 1) * U))) for i in range(R)]
        rings = [dist.new_group(list(range(j, world, U))) for j in range(U)]
        rank = dist.get_rank()
        _MESHES[U] = (ulysses[rank // U], rings[rank % U])
    return _MESHES[U]


def run_case(seed, B, L, S, H, D, T=0, joint_first=False, dtype=torch.float32, U=None, **opts):
    """On every rank: ring (U None) or Ulysses x Ring (U ranks per Ulysses group) vs the reference on this rank's
    real tokens; rank w holds global block w in both. Returns (max abs err, rel L2 err, joint err, joint out)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    N = world * L
    (q, k, v), joint = make_inputs(seed, B, N, S, H, D, T, dtype)
    ref, ref_joint = reference(q, k, v, S, joint, joint_first)
    mine = [t[:, rank * L : (rank + 1) * L] for t in (q, k, v)]
    if U is None:
        res = ring_attention(*mine, seq_len=S, joint=joint, joint_first=joint_first)
    else:
        group, ring_group = mesh(U)
        res = ulysses_attention(*mine, group=group, ring_group=ring_group, seq_len=S, joint=joint,
                                joint_first=joint_first, **opts)
    out, joint_out = res if joint else (res, None)
    assert out.shape == mine[0].shape and out.dtype == dtype
    real = max(0, min(L, S - rank * L))
    got, want = out[:, :real].double(), ref[:, rank * L : rank * L + real]
    err = (got - want).abs().max().item() if real else 0.0
    rel = ((got - want).norm() / want.norm()).item() if real else 0.0
    if joint is None:
        return err, rel, None, None
    assert joint_out.shape == joint[0].shape and joint_out.dtype == dtype
    return err, rel, (joint_out.double() - ref_joint).abs().max().item(), joint_out.float()


def run_cases(cases):
    return [run_case(**case) for case in cases]


def grid(**axes):
    keys = list(axes)
    cases = [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
    return [c for c in cases if c.get("T") or not c.get("joint_first")]


def lengths(world, L):
    """Real lengths: full, a partial last block, the last block all padding (two blocks where there are 3+)."""
    out = [world * L, world * L - 3, (world - 1) * L - 1]
    return out + ([(world - 2) * L] if world > 2 else [])


def check(results, cases, tol, rel_tol=None):
    for rank_results in results:
        for case, (err, rel, joint_err, _) in zip(cases, rank_results):
            assert err < tol, (case, err)
            assert rel_tol is None or rel < rel_tol, (case, rel)
            assert joint_err is None or joint_err < tol, (case, joint_err)
    # The joint output is the same arithmetic everywhere: bit-for-bit identical on every rank.
    for i, case in enumerate(cases):
        outs = [rank_results[i][3] for rank_results in results]
        if outs[0] is not None:
            assert all(torch.equal(outs[0], o) for o in outs[1:]), case


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_matches_reference_fp32(dist_pools, world):
    L = 5
    cases = grid(seed=[0], B=[1, 2], L=[L], S=lengths(world, L), H=[3], D=[8], T=[0, 3], joint_first=[False, True])
    check(dist_pools(world).run(run_cases, cases), cases, 1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_bf16(dist_pools, world):
    # bf16 inputs and outputs (8 mantissa bits: values of magnitude ~1 round to within ~2^-8), fp32 merge.
    L = 8
    cases = grid(seed=[1], B=[1], L=[L], S=lengths(world, L), H=[4], D=[32], T=[0, 4], joint_first=[False, True],
                 dtype=[torch.bfloat16])
    check(dist_pools(world).run(run_cases, cases), cases, 2e-2, rel_tol=1e-2)


@pytest.mark.parametrize("world, U", [(4, 2), (6, 2)])
def test_hybrid_matches_reference(dist_pools, world, U):
    # Ulysses 2 x Ring 2 and 2 x 3: even and uneven heads (3, 5 on 2 ranks), chunked heads, padding that leaves
    # whole ring blocks empty, joint tokens on either side, both wire layouts.
    L = 3
    fuse = [True, False] if world == 4 else [True]  # the wire layout is the all-to-all's business: once is enough
    cases = grid(seed=[2], B=[1], L=[L], S=lengths(world, L), H=[4, 3, 5], D=[8], T=[0, 2],
                 joint_first=[False, True], head_chunks=[1, 2], fuse_qkv=fuse, U=[U])
    check(dist_pools(world).run(run_cases, cases), cases, 1e-5)


@pytest.mark.parametrize("U", [1, 2])
def test_hybrid_degenerate_meshes(dist_pools, U):
    # 2 ranks as Ulysses 1 x Ring 2 (groups of one: the ring does it all) and Ulysses 2 x Ring 1 (rings of one).
    L = 4
    cases = grid(seed=[9], B=[1], L=[L], S=lengths(2, L), H=[3], D=[8], T=[0, 2], joint_first=[False, True],
                 head_chunks=[1, 2], U=[U])
    check(dist_pools(2).run(run_cases, cases), cases, 1e-5)


def test_hybrid_bf16_and_fp8(dist_pools):
    L = 8
    cases = grid(seed=[3], B=[1], L=[L], S=[4 * L - 5], H=[5], D=[32], T=[0, 3], joint_first=[True],
                 dtype=[torch.bfloat16], U=[2], head_chunks=[1, 2])
    check(dist_pools(4).run(run_cases, cases), cases, 2e-2, rel_tol=1e-2)
    # fp8 on the all-to-alls only: within ulysses_attention's stated bound (rel 6%, max abs 0.2).
    fp8 = [dict(c, fp8_comm=True, dtype=torch.float32) for c in cases]
    for rank_results in dist_pools(4).run(run_cases, fp8):
        for case, (err, rel, _, _) in zip(fp8, rank_results):
            assert err < 0.2 and 1e-4 < rel < 0.06, (case, err, rel)


def test_ring_one_rank_and_no_group_is_local_attention(dist_pools):
    (err, _, joint_err, _), = dist_pools(1).run(run_case, seed=4, B=1, L=7, S=5, H=2, D=8, T=2)
    assert err < 1e-5 and joint_err < 1e-5
    (q, k, v), _ = make_inputs(5, 1, 9, 6, 2, 8)
    want, _ = reference(q, k, v, 6)
    assert (ring_attention(q, k, v, seq_len=6)[:, :6].double() - want[:, :6]).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------------------
# What the ring does on the wire: overlap, skipped blocks, only real keys sent


def _trace_ring(S, L, T=0):
    """Run the ring with batch_isend_irecv, work.wait and the kernel instrumented; this rank's event list."""
    import attention.ring as ring

    events = []

    class Traced:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append(("wait",))
            return self.work.wait()

    real_batch, real_lse = dist.batch_isend_irecv, ring.local_attention_lse

    def batch(ops):
        events.append(("post", tuple((op.op.__name__, op.tensor.shape[2]) for op in ops)))
        return [Traced(w) for w in real_batch(ops)]

    def lse(q, k, v, **kw):
        events.append(("attend", k.shape[1]))
        return real_lse(q, k, v, **kw)

    dist.batch_isend_irecv, ring.local_attention_lse = batch, lse
    try:
        run_case(seed=6, B=1, L=L, S=S, H=2, D=8, T=T)
    finally:
        dist.batch_isend_irecv, ring.local_attention_lse = real_batch, real_lse
    return events


def test_ring_overlaps_and_skips_padding(dist_pools):
    # 3 ranks, L=4, S=5: block 0 has 4 real keys, block 1 one, block 2 none.
    valid, P = [4, 1, 0], 3
    for rank, events in enumerate(dist_pools(P).run(_trace_ring, 5, 4)):
        # Per step: the next block's transfer is posted, then the current block attended, then the transfer
        # waited for. Only real keys travel; the all-padding block is neither sent, received nor attended.
        want = []
        for step in range(P):
            b = (rank - step) % P
            ops = [] if step == P - 1 else [("isend", valid[b])] * bool(valid[b]) + [
                ("irecv", valid[(b - 1) % P])] * bool(valid[(b - 1) % P])
            want += [("post", tuple(ops))] * bool(ops) + [("attend", valid[b])] * bool(valid[b])
            want += [("wait",)] * bool(ops)
        got = [e for i, e in enumerate(events) if not (e == ("wait",) and i and events[i - 1] == ("wait",))]
        assert got == want, (rank, events)


def _joint_calls():
    # Joint keys (T=2) in exactly one kernel call per rank for the sequence queries, and on rank 0 only for the
    # joint queries: count the calls whose keys include them (L=3 sequence keys each, so T shows as L+2 or 2).
    return dist.get_rank(), _trace_ring(6, 3, T=2)


def test_joint_keys_attended_once(dist_pools):
    for rank, ev in dist_pools(2).run(_joint_calls):
        sizes = [e[1] for e in ev if e[0] == "attend"]
        # Sequence queries: blocks of 3, 3 and one of them with the joint 2 -> one 5. Joint queries: 3 (+2 on rank 0).
        assert sorted(sizes) == sorted([3, 5] + [5 if rank == 0 else 3]), (rank, sizes)


# --------------------------------------------------------------------------------------------------------------
# Validation: a mismatch is a ValueError on every rank, the group stays usable; waits are bounded


def _bad_ring_call(kind):
    rank, world = dist.get_rank(), dist.get_world_size()
    L = 4 + (kind == "S_local" and rank == 1)
    dtype = torch.float16 if kind == "dtype" and rank == world - 1 else torch.float32
    q = torch.randn(1, L, 4, 8).to(dtype)
    k = torch.randn(1, L, 4, 4) if kind == "shape" and rank == 0 else q.clone()
    opts = {}
    if kind == "seq_len":
        opts["seq_len"] = world * L + 1 if rank == 0 else world * L
    if kind == "seq_len_differs":
        opts["seq_len"] = world * L - rank
    if kind == "joint" and rank == 0:
        opts["joint"] = (q[:, :2], q[:, :2], q[:, :2])
    if kind == "joint_first":
        opts = dict(joint=(q[:, :2], q[:, :2], q[:, :2]), joint_first=rank == 1)
    if kind == "backend" and rank == 1:
        opts["backend"] = "no-such-backend"
    try:
        ring_attention(q, k, q.clone(), **opts)
    except ValueError as e:
        return str(e)
    return None


def _healthy():
    x = torch.ones(1) * dist.get_rank()
    dist.all_reduce(x)
    return x.item()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["S_local", "dtype", "shape", "seq_len", "seq_len_differs", "joint", "joint_first",
                                  "backend"])
def test_ring_mismatch_is_value_error_on_every_rank(dist_pools, world, kind):
    pool = dist_pools(world)
    messages = pool.run(_bad_ring_call, kind, timeout=30)
    assert all(messages), messages
    assert pool.run(_healthy) == [sum(range(world))] * world


def _bad_hybrid_call(kind):
    rank = dist.get_rank()
    group, ring_group = mesh(2)
    # Rank 3 (ring index 1, Ulysses index 1) is the odd one out: ranks 0 and 1 share neither group with it.
    H = 5 if kind == "heads" and rank == 3 else 4
    q = torch.randn(1, 3, H, 8)
    opts = {"head_chunks": 2} if kind == "head_chunks" and rank == 3 else {}
    if kind == "seq_len" and rank == 3:
        opts["seq_len"] = 13
    try:
        ulysses_attention(q, q.clone(), q.clone(), group=group, ring_group=ring_group, **opts)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", ["heads", "head_chunks", "seq_len"])
def test_hybrid_mismatch_is_value_error_on_every_rank(dist_pools, kind):
    pool = dist_pools(4)
    messages = pool.run(_bad_hybrid_call, kind, timeout=30)
    assert all(messages), messages
    assert pool.run(_healthy) == [6.0] * 4


_CROSSED: list = []


def _crossed_mesh():
    # Rings {0, 3} and {1, 2} across Ulysses groups {0, 1} and {2, 3}: not a mesh (a ring must keep one Ulysses
    # index), so no rank can hold block i*U + j of a consistent layout; the validation says so on every rank.
    if not _CROSSED:
        groups = [dist.new_group(r) for r in ([0, 1], [2, 3], [0, 3], [1, 2])]
        rank = dist.get_rank()
        _CROSSED.extend([groups[rank // 2], groups[2] if rank in (0, 3) else groups[3]])
    group, ring_group = _CROSSED
    q = torch.randn(1, 3, 4, 8)
    try:
        ulysses_attention(q, q, q, group=group, ring_group=ring_group)
    except ValueError as e:
        return str(e)
    return None


def test_hybrid_crossed_groups_refused(dist_pools):
    messages = dist_pools(4).run(_crossed_mesh, timeout=30)
    assert all(m and "index differs" in m for m in messages), messages


def _stalled_ring():
    """Rank 1 thinks its block is all padding, so it sends nothing: rank 0 waits for a block that never comes.
    That wait must end with gloo's timeout error after the group's 2 s; rank 1 keeps the group open for 5 s, so an
    unbounded wait would instead end with 'connection closed' when rank 1 leaves."""
    from attention.ring import ring_pass

    group = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    rank = dist.get_rank()
    q = torch.randn(1, 4, 2, 8)
    t0 = time.monotonic()
    try:
        ring_pass(q, q, q, group, 2, rank, 8 if rank == 0 else 4, None, False, "auto")
        outcome = "returned"
    except RuntimeError as e:
        outcome = f"error: {e}"
    seconds = time.monotonic() - t0
    if rank == 1:
        time.sleep(5)
    dist.destroy_process_group(group)  # the stalled transfer dies with its group; the pool's group is untouched
    return rank, outcome, seconds


def test_ring_wait_is_bounded_by_group_timeout(dist_pools):
    pool = dist_pools(2)
    results = pool.run(_stalled_ring, timeout=60)
    (_, outcome0, seconds0), (_, outcome1, _) = results
    assert outcome0.startswith("error") and "timed out" in outcome0.lower(), results
    assert outcome1 == "returned", results
    assert seconds0 < 30, results  # the group's 2 s, not the pool's 60 s
    assert pool.run(_healthy) == [1.0, 1.0]


# --------------------------------------------------------------------------------------------------------------
# Attention with log-sum-exp on every backend


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2),
                                        (torch.float16, 5e-3)])
def test_local_attention_lse_matches_fp64(backend, dtype, tol):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 7, 3, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 11, 3, 16, generator=g).to(dtype) for _ in range(2))
    k[:, 9:], v[:, 9:] = GARBAGE, -GARBAGE
    out, lse = local_attention_lse(q, k, v, backend=backend, kv_len=9)
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k[:, :9].double()) / 4.0
    want_lse = torch.logsumexp(scores, -1)
    want = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, -1), v[:, :9].double())
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 3, 7) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (lse.double() - want_lse).abs().max() < (1e-10 if dtype == torch.float64 else 1e-5)
    assert (out.double() - want).abs().max() < tol


def test_explicit_lse_chunks_queries_exactly():
    from attention.local import _explicit_lse

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 10, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    whole, lse = _explicit_lse(q, k, v)
    chunked, lse_chunked = _explicit_lse(q, k, v, max_scores=2 * 10 * 3)  # 3 queries per chunk
    assert torch.allclose(whole, chunked, atol=1e-14) and torch.allclose(lse, lse_chunked, atol=1e-14)


def test_ring_local_validation_messages():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="seq_len must be in 1..4"):
        ring_attention(q, q, q, seq_len=5)
    with pytest.raises(ValueError, match="joint must be"):
        ring_attention(q, q, q, joint=(q, q))
    with pytest.raises(ValueError, match="joint_first must be a bool"):
        ring_attention(q, q, q, joint_first=1)
    with pytest.raises(ValueError, match="available: auto"):
        ring_attention(q, q, q, backend="nope")
    with pytest.raises(ValueError, match="process group but torch.distributed is not initialised"):
        ring_attention(q, q, q, group=object())
