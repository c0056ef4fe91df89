"""``gist-ray doctor --address``: the doctor's checks (gist_ray.doctor) on every GPU node of a
Ray cluster, one Ray task per node pinned to it (node affinity, not soft) and holding all of
its GPUs, so every GPU of the node is checked and the all-gather runs across them. A cluster
without GPU nodes gets the CPU check on every node that has a CPU. Each node's report comes
back as JSON; a node whose task fails or does not finish in time is a failed check."""

from __future__ import annotations

import logging
from typing import Any

from gist_ray.doctor import Settings, check_machine
from gist_ray.doctor.compare import one_line
from gist_ray.launch import cluster

log = logging.getLogger(__name__)


def _check_node(settings: dict[str, Any]) -> dict[str, Any]:
    """Runs in the Ray task on the node: the local check, and which node it ran on."""
    import ray

    report = check_machine(Settings.from_dict(settings), progress=lambda _: None)
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), **report}


def failed_node(node: dict[str, Any], error: str) -> dict[str, Any]:
    """The report of a node whose check did not come back."""
    return {
        "node_id": node["NodeID"], "node_ip": node.get("NodeManagerAddress", "?"),
        "host": node.get("NodeManagerHostname", "?"), "versions": {}, "gpus": [],
        "checks": [{"case": "node", "device": "-", "ok": False, "error": error}],
        "speed": [], "notes": [], "ok": False,
    }  # fmt: skip


def targets(nodes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the nodes to check, the alive nodes left out): every node with a GPU, or, on a cluster
    without GPUs, every node with a CPU (a head started with 0 CPUs runs no task)."""
    alive = [n for n in nodes if n.get("Alive")]
    chosen = [n for n in alive if n["Resources"].get("GPU", 0) >= 1]
    if not chosen:
        chosen = [n for n in alive if n["Resources"].get("CPU", 0) >= 1]
    return chosen, [n for n in alive if n not in chosen]


def check_cluster(cfg, settings: Settings, timeout: float) -> dict[str, Any]:
    """Connect to ``cfg.ray.address``, check every target node, disconnect. Returns
    ``{"nodes": [report...], "skipped_nodes": [...]}``, each report with ``node_id`` and
    ``node_ip``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster.connect(cfg)
    try:
        chosen, skipped = targets(ray.nodes())
        kind = "GPU" if any(n["Resources"].get("GPU", 0) >= 1 for n in chosen) else "CPU"
        left_out = [{"node_id": n["NodeID"], "node_ip": n.get("NodeManagerAddress", "?"),
                     "why": f"no {kind}"} for n in skipped]  # fmt: skip
        if not chosen:
            return {"nodes": [], "skipped_nodes": left_out}
        task = ray.remote(_check_node)
        pending = {}
        for node in chosen:
            res = node["Resources"]
            ref = task.options(
                num_cpus=1 if res.get("CPU", 0) >= 1 else 0,
                num_gpus=int(res.get("GPU", 0)),
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(settings.to_dict())
            pending[ref] = node
        log.info("checking %d %s node(s) of the cluster", len(chosen), kind)
        _, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        held = "its GPUs" if kind == "GPU" else "its CPUs"
        reports = []
        for ref, node in pending.items():
            if ref in set(late):
                ray.cancel(ref, force=True)
                why = f"the check did not finish within {timeout:g} s (are {held} held by a job?)"
                reports.append(failed_node(node, why))
                continue
            try:
                reports.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a node's failure is its report
                cause = getattr(e, "cause", None) or e  # a RayTaskError's own exception
                reports.append(failed_node(node, f"the check's task failed: {one_line(cause)}"))
        return {"nodes": reports, "skipped_nodes": left_out}
    finally:
        cluster.shutdown()
