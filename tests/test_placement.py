"""Placement plans from the config and the nodes alive now (no Ray needed): GPU jobs never fall back to CPU ranks
and are not refused for lack of GPUs (the driver asks the autoscaler and waits), one bundle per Ulysses group so
a group never spans nodes, rank 0 gets the node's spare cores when it encodes on CPU."""

from __future__ import annotations

import pytest

from cluster.placement import PlacementError, plan_placement, shortfall
from configs import load_config


def config(*overrides):
    return load_config("cpu-smoke", list(overrides))


def test_gpu_jobs_wait_for_gpus_instead_of_failing_or_falling_back_to_cpu():
    cfg = config("parallel.replicas=2", "parallel.ulysses_degree=8", "runtime.device=auto")
    nodes = [{"CPU": 96.0, "GPU": 8.0}]
    shape = plan_placement(cfg, nodes)
    assert shape.num_gpus == 1 and shape.num_cpus == 1 and shape.strategy == "STRICT_PACK"
    assert shortfall(shape, 2, nodes) == "needs 16 GPUs; the cluster has 8"
    assert shortfall(shape, 1, nodes) is None
    # Right after `cluster up`: only the CPU head. A GPU preset plans GPU ranks, never 16 CPU ranks.
    head = [{"CPU": 8.0}]
    for preset in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        gpu_cfg = load_config(preset, ["parallel.ulysses_degree=8", "parallel.replicas=2"])
        shape = plan_placement(gpu_cfg, head)
        assert shape.num_gpus == 1 and shape.bundles() == [{"CPU": 8.0, "GPU": 8.0}]
        assert shortfall(shape, 2, head) == "needs 16 GPUs; the cluster has 0"


def test_one_bundle_per_ulysses_group_so_a_group_never_spans_nodes():
    cfg = config("parallel.ulysses_degree=8", "runtime.device=cuda")
    nodes = [{"CPU": 16.0, "GPU": 6.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 8.0}]
    shape = plan_placement(cfg, nodes)
    assert shape.bundles() == [{"CPU": 8.0, "GPU": 8.0}]  # not eight 1-GPU bundles PACKed as 6+2
    assert shortfall(shape, 1, nodes) is None
    assert "a node with 8 GPUs for each Ulysses group" in shortfall(shape, 2, nodes[:2] + nodes[:2])
    # cfg halves are separate groups: each on one node, the two may be on different nodes
    cfg = config("parallel.ulysses_degree=4", "parallel.cfg_degree=2", "runtime.device=cuda")
    nodes = [{"CPU": 8.0, "GPU": 4.0}] * 2
    shape = plan_placement(cfg, nodes)
    assert shape.bundles() == [{"CPU": 4.0, "GPU": 4.0}] * 2 and shape.strategy == "PACK"
    assert shortfall(shape, 1, nodes) is None


def test_cpu_only_jobs_are_sized_to_fit_or_refused_with_what_is_missing():
    shape = plan_placement(config("parallel.ulysses_degree=4", "parallel.cfg_degree=2"), [{"CPU": 2.0}])
    assert shape.num_cpus == 0.25 and shape.strategy == "STRICT_PACK" and shape.num_gpus == 0  # sized to fit
    assert shape.bundles() == [{"CPU": 1.0}, {"CPU": 1.0}]
    with pytest.raises(PlacementError, match="needs 4 workers x 2 CPUs in groups of 4 per node; the Ray cluster "
                                             r"has 4 CPUs \(largest node 4\)"):
        plan_placement(config("parallel.ulysses_degree=4", "runtime.num_cpus_per_worker=2"), [{"CPU": 4.0}])
    with pytest.raises(PlacementError, match="STRICT_PACK needs 4 x 1 CPU on one node"):
        plan_placement(config("parallel.ulysses_degree=2", "parallel.cfg_degree=2", "runtime.num_cpus_per_worker=1",
                              "runtime.placement=STRICT_PACK"), [{"CPU": 2.0}] * 2)
    shape = plan_placement(config("parallel.ulysses_degree=2", "parallel.cfg_degree=2",
                                  "runtime.num_cpus_per_worker=1"), [{"CPU": 2.0}] * 2)
    assert shape.strategy == "PACK" and shape.bundles() == [{"CPU": 2.0}] * 2


def test_rank0_gets_the_spare_cores_when_it_encodes_on_cpu():
    nodes = [{"CPU": 32.0, "GPU": 8.0}]
    base = ["parallel.ulysses_degree=4", "parallel.replicas=2", "runtime.device=cuda"]
    plain = plan_placement(config(*base), nodes)
    assert plain.encoder_cpus == 0 and plain.worker_threads(0, 0) == 1
    shape = plan_placement(config(*base, "model.text_encoder_device=cpu"), nodes)
    # two replicas fit the node: each rank 0 gets half of the 22 cores beyond one per GPU and 2 left for Ray
    assert shape.encoder_cpus == 11 and shape.bundles() == [{"CPU": 15.0, "GPU": 4.0}]
    assert shape.worker_cpus(0, 0) == 12 and shape.worker_threads(0, 0) == 12
    assert shape.worker_cpus(0, 1) == 1 and shape.worker_threads(0, 1) == 1
    assert shortfall(shape, 2, nodes) is None
    explicit = plan_placement(config(*base, "model.text_encoder_device=cpu", "runtime.encoder_cpus=3"), nodes)
    assert explicit.worker_threads(0, 0) == 4


def test_rank0_takes_a_bounded_share_of_a_big_node():
    """A 96-core node with 8 GPUs: rank 0 does not take all 88 spare cores (other replicas, Ray need some)."""
    nodes = [{"CPU": 96.0, "GPU": 8.0}]
    shape = plan_placement(config("parallel.ulysses_degree=8", "runtime.device=cuda",
                                  "model.text_encoder_device=cpu"), nodes)
    assert shape.encoder_cpus == 16 and shape.bundles() == [{"CPU": 24.0, "GPU": 8.0}]
    assert shape.worker_threads(0, 0) == 17 and shape.worker_threads(0, 1) == 1


def test_rank0_gets_a_default_share_when_no_gpu_node_is_up_yet():
    """Autoscaling cluster right after `up`: only the CPU head is there to size from; rank 0 still gets real cores
    (a fixed default), not one thread for the whole batch."""
    shape = plan_placement(config("parallel.ulysses_degree=2", "runtime.device=cuda",
                                  "model.text_encoder_device=cpu"), [{"CPU": 4.0}])
    assert shape.encoder_cpus == 8 and shape.bundles() == [{"CPU": 10.0, "GPU": 2.0}]
    assert shape.worker_threads(0, 0) == 9 and shape.worker_threads(0, 1) == 1


@pytest.mark.parametrize("override, message", [
    ("runtime.scale_up_timeout_s=0", "scale_up_timeout_s must be > 0"),
    ("runtime.scale_up_timeout_s=.inf", "scale_up_timeout_s must be a finite number"),
    ("runtime.rebuild_backoff_s=100", "rebuild_backoff_s must be > 0 and <= rebuild_backoff_max_s"),
    ("runtime.encoder_cpus=-1", "encoder_cpus must be >= 0"),
])
def test_recovery_settings_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        config(override)


# -- Ulysses x Ring (issue #13) ----------------------------------------------------------------------------------


def test_a_ring_spreads_a_replica_over_nodes_one_ulysses_group_per_node():
    # ulysses 8 x ring 2 on 2 nodes of 8 GPUs: two bundles of 8, one per node (PACK: the replica spans the nodes)
    cfg = config("parallel.ulysses_degree=8", "parallel.ring_degree=2", "runtime.device=cuda")
    nodes = [{"CPU": 16.0, "GPU": 8.0}] * 2
    shape = plan_placement(cfg, nodes)
    assert shape.bundles() == [{"CPU": 8.0, "GPU": 8.0}] * 2 and shape.strategy == "PACK"
    assert (shape.group_size, shape.groups) == (8, 2)
    assert shortfall(shape, 1, nodes) is None
    # the same replica on one 16-GPU node stays on it
    assert plan_placement(cfg, [{"CPU": 32.0, "GPU": 16.0}]).strategy == "STRICT_PACK"
    # cfg 2 x ring 2 x ulysses 2: four bundles, g = cfg_rank * 2 + ring_rank, each a pair of consecutive ranks
    cfg = config("parallel.ulysses_degree=2", "parallel.ring_degree=2", "parallel.cfg_degree=2",
                 "runtime.device=cuda")
    shape = plan_placement(cfg, [{"CPU": 8.0, "GPU": 2.0}] * 4)
    assert shape.bundles() == [{"CPU": 2.0, "GPU": 2.0}] * 4 and shape.strategy == "PACK"
    # CPU-only: two 1-CPU nodes hold ulysses 2 x ring 2 at half a CPU a rank, a group per node
    shape = plan_placement(config("parallel.ulysses_degree=2", "parallel.ring_degree=2"), [{"CPU": 1.0}] * 2)
    assert shape.num_cpus == 0.5 and shape.bundles() == [{"CPU": 1.0}] * 2 and shape.strategy == "PACK"


def test_a_ulysses_group_larger_than_every_node_is_refused_with_a_layout_that_fits():
    nodes = [{"CPU": 16.0, "GPU": 8.0}] * 2
    with pytest.raises(PlacementError, match=r"^1 replica\(s\) x cfg 1 x ulysses 16: a Ulysses group of 16 GPUs "
                                             r"must fit on one node .* the largest GPU node has 8; use "
                                             r"--ulysses 8 --ring 2 \("):
        plan_placement(config("parallel.ulysses_degree=16", "runtime.device=cuda"), nodes)
    with pytest.raises(PlacementError, match="use --ulysses 2 --ring 5"):  # 10 ranks on nodes of 4: groups of 2
        plan_placement(config("parallel.ulysses_degree=10", "runtime.device=cuda"), [{"CPU": 8.0, "GPU": 4.0}])
    # no GPU node up yet (autoscaling from zero): nothing to judge by, so the job waits for nodes
    assert plan_placement(config("parallel.ulysses_degree=16", "runtime.device=cuda"), [{"CPU": 8.0}]).num_gpus == 1
    # CPU ranks: a group of 4 on nodes of 2 CPUs at 1 CPU a rank cannot be placed
    with pytest.raises(PlacementError, match="in groups of 4 per node"):
        plan_placement(config("parallel.ulysses_degree=4", "runtime.num_cpus_per_worker=1"), [{"CPU": 2.0}] * 2)


def test_strict_pack_on_gpus_is_refused_once_every_gpu_node_up_is_too_small():
    base = ["parallel.ulysses_degree=2", "parallel.ring_degree=2", "runtime.device=cuda",
            "runtime.placement=STRICT_PACK"]
    # two 2-GPU nodes never hold a 4-GPU replica on one node: refused now, not after the scale-up timeout
    with pytest.raises(PlacementError, match=r"STRICT_PACK needs 4 x 1 GPU on one node.*largest node has 2.*PACK"):
        plan_placement(config(*base), [{"CPU": 8.0, "GPU": 2.0}] * 2 + [{"CPU": 64.0}])
    # no GPU node up yet: the autoscaler may still bring a 4-GPU one
    assert plan_placement(config(*base), [{"CPU": 8.0}]).strategy == "STRICT_PACK"
    assert plan_placement(config(*base), [{"CPU": 8.0, "GPU": 4.0}]).strategy == "STRICT_PACK"
