"""Shared pieces of the Ray tests: configs on the tiny Wan folder and cluster hygiene checks."""

from __future__ import annotations

from configs import load_config


def ray_config(folder, *overrides):
    return load_config("cpu-smoke", [f"model.path={folder}", "runtime.collective_timeout_s=60",
                                     "runtime.placement_timeout_s=60", *overrides])


def assert_cluster_clean():
    """Every placement group removed and every CPU/GPU free again: no leaked actors or reservations."""
    import time

    import ray

    deadline = time.time() + 20
    while True:
        groups = ray.util.placement_group_table()
        live = [g for g in groups.values() if g["state"] != "REMOVED"]
        total, free = ray.cluster_resources(), ray.available_resources()
        leaked = {k: total[k] - free.get(k, 0) for k in ("CPU", "GPU") if k in total and free.get(k, 0) < total[k]}
        if not live and not leaked:
            return
        if time.time() > deadline:
            raise AssertionError(f"leaked placement groups {live} or resources {leaked}")
        time.sleep(0.5)
