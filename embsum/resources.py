"""Will the work fit the cluster? Checks that fail in seconds, naming the numbers and the fix.

Ray waits, silently and without end, for resources no node has: a Ray Train worker larger than
any node's CPUs, a Ray Data task on a cluster whose CPUs the train workers took (Data reads need a
whole CPU on one node; two 2-CPU nodes with 1.5-CPU train workers leave 0.5 on each, and the
training stream waited forever: measured), a Serve replica larger than any node. On a cluster
that cannot add nodes such a wait never ends, so the train and serve stages check first, with
the cluster's per-node totals (what could ever be free; not what happens to be busy right now):

- ``check_train``: place the workers as Ray Train's default PACK placement group does (fill the
  largest nodes first); every worker must fit, and some node must keep ``DATA_TASK_CPUS`` for
  Ray Data's read and map tasks.
- ``check_serve``: the minimum number of replicas must fit, one replica's CPUs/GPUs on one node.

A cluster that can autoscale (its autoscaler config allows more CPUs than it has) is not judged:
a pending request is how it asks for nodes. The arithmetic is pure (``place``); ``cluster_nodes``
and ``can_autoscale`` read the connected Ray cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DATA_TASK_CPUS = 1.0  # what a Ray Data read or map task asks for (Ray Data's default num_cpus)


class ResourceError(ValueError):
    """The work can never be placed on this cluster as configured."""


@dataclass(frozen=True)
class Node:
    """One node's schedulable resources (totals)."""

    name: str
    cpus: float
    gpus: float = 0.0


def place(nodes: list[Node], count: int, cpus: float, gpus: float = 0.0) -> tuple[list[int], list[float]]:
    """Place ``count`` bundles of (cpus, gpus) the way a PACK placement group does: onto as few
    nodes as possible, the largest first. -> (bundles per node, CPUs left per node), in ``nodes``
    order; bundles that fit nowhere are not counted."""
    order = sorted(range(len(nodes)), key=lambda k: (-nodes[k].cpus, -nodes[k].gpus, k))
    left_c = [n.cpus for n in nodes]
    left_g = [n.gpus for n in nodes]
    placed = [0] * len(nodes)
    eps = 1e-9
    for _ in range(count):
        for k in order:
            if left_c[k] + eps >= cpus and left_g[k] + eps >= gpus:
                left_c[k] -= cpus
                left_g[k] -= gpus
                placed[k] += 1
                break
        else:
            break
    return placed, [round(c, 6) for c in left_c]


def _describe(nodes: list[Node]) -> str:
    return ", ".join(f"{n.name}: {n.cpus:g} CPU" + (f" {n.gpus:g} GPU" if n.gpus else "") for n in nodes)


def _largest_fitting_cpus(nodes: list[Node], workers: int, gpus: float, current: float) -> float | None:
    """The largest train.cpus_per_worker below ``current`` (a multiple of 0.25) that places every
    worker and leaves a Data task's CPUs on some node; None when none does."""
    c = (int(current * 4) / 4) if current * 4 != int(current * 4) else current - 0.25
    while c >= 0.25 - 1e-9:
        placed, left = place(nodes, workers, c, gpus)
        if sum(placed) == workers and max(left, default=0.0) + 1e-9 >= DATA_TASK_CPUS:
            return c
        c -= 0.25
    return None


def check_train(nodes: list[Node], workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
                data_cpus: float = DATA_TASK_CPUS) -> None:
    """Raise ``ResourceError`` when the train workers cannot all be placed, or leave no node with
    ``data_cpus`` free for Ray Data (the training data stream would wait forever)."""
    placed, left = place(nodes, workers, cpus_per_worker, gpus_per_worker)
    ask = f"train.num_workers={workers} x train.cpus_per_worker={cpus_per_worker:g} CPU" + \
        (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
    if sum(placed) < workers:
        raise ResourceError(
            f"the training workers cannot be placed: {ask}, and only {sum(placed)} fit on this cluster's "
            f"nodes ({_describe(nodes)}); Ray would wait for them forever. Fix: lower train.cpus_per_worker or "
            f"train.num_workers, or add nodes/CPUs (ray.num_cpus for a local cluster)")
    if max(left, default=0.0) + 1e-9 >= data_cpus:
        return
    fit = _largest_fitting_cpus(nodes, workers, gpus_per_worker, cpus_per_worker)
    fixes = [f"train.cpus_per_worker={fit:g}" if fit else None,
             f"train.num_workers={workers - 1}" if workers > 1 else None,
             "nodes/CPUs (ray.num_cpus for a local cluster)"]
    spread = ", ".join(f"{n.name}: {p} worker(s), {c:g} CPU left" for n, p, c in zip(nodes, placed, left, strict=True))
    raise ResourceError(
        f"no CPU would be left for Ray Data: {ask} take the nodes to ({spread}), and a Ray Data read/map task "
        f"needs {data_cpus:g} CPU on one node, so the training data stream would wait forever. Fix: "
        + " or ".join(f for f in fixes if f) + " (a Ray Data task needs a whole free CPU on one node)")


def check_serve(nodes: list[Node], replicas: int, cpus: float, gpus: float = 0.0) -> None:
    """Raise ``ResourceError`` when ``replicas`` Serve replicas of (cpus, gpus) cannot be placed."""
    if replicas <= 0:
        return
    placed, _ = place(nodes, replicas, cpus, gpus)
    if sum(placed) >= replicas:
        return
    ask = f"serve.min_replicas={replicas} x serve.num_cpus={cpus:g}" + (f" + serve.num_gpus={gpus:g}" if gpus else "")
    raise ResourceError(
        f"the Serve replicas cannot be placed: {ask}, and only {sum(placed)} fit on this cluster's nodes "
        f"({_describe(nodes)}); Serve would wait for them forever. Fix: lower serve.num_cpus"
        + (" or serve.num_gpus" if gpus else "") + " or serve.min_replicas, or add nodes/CPUs")


# ---- the connected Ray cluster ---------------------------------------------------------------

def cluster_nodes() -> list[Node]:
    """Every alive node's total CPUs/GPUs (a 0-CPU head included: it takes no work)."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        name = f"{n.get('NodeManagerAddress', '?')}:{n.get('NodeManagerPort', '?')}"
        nodes.append(Node(name, float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return sorted(nodes, key=lambda n: n.name)


def can_autoscale() -> bool:
    """True when the cluster's autoscaler config allows more CPUs than the cluster has now."""
    import ray

    try:
        from ray._private.state import state

        limits: dict[str, Any] | None = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: no answer means no autoscaler we know of
        log.debug("autoscaler config not readable: %s", e)
        return False
    if not limits:
        return False
    return float(limits.get("CPU", 0)) > float(ray.cluster_resources().get("CPU", 0))


def preflight_train(workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0) -> None:
    """``check_train`` on the connected cluster, unless it can autoscale."""
    if can_autoscale():
        log.info("resource preflight skipped: the cluster can autoscale")
        return
    check_train(cluster_nodes(), workers, cpus_per_worker, gpus_per_worker)


def preflight_serve(replicas: int, cpus: float, gpus: float = 0.0) -> None:
    """``check_serve`` on the connected cluster, unless it can autoscale."""
    if can_autoscale():
        log.info("resource preflight skipped: the cluster can autoscale")
        return
    check_serve(cluster_nodes(), replicas, cpus, gpus)
