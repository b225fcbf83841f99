"""The resource preflight's arithmetic (no Ray): PACK placement, the train check that keeps a CPU
for Ray Data, the Serve replica check, and messages that name the numbers and the fix."""

from __future__ import annotations

import pytest

from embsum.resources import Node, ResourceError, check_serve, check_train, place

HEAD = Node("head", 0.0)  # a KubeRay head takes no work


def test_place_packs_the_largest_nodes_first_and_counts_what_fits():
    nodes = [HEAD, Node("a", 2.0), Node("b", 3.0)]
    assert place(nodes, 2, 1.0) == ([0, 0, 2], [0.0, 2.0, 1.0])  # both on b (PACK)
    assert place(nodes, 3, 1.5) == ([0, 1, 2], [0.0, 0.5, 0.0])
    assert place(nodes, 4, 1.5) == ([0, 1, 2], [0.0, 0.5, 0.0])  # the fourth fits nowhere
    assert place([Node("g", 8.0, 1.0)], 2, 1.0, gpus=1.0)[0] == [1]  # one GPU: one worker


def test_train_workers_that_leave_no_whole_cpu_for_data_fail_with_the_numbers_and_a_fix():
    # The measured hang: two 2-CPU nodes, 2 workers x 1.5 CPU -> 0.5 CPU left on each node.
    nodes = [HEAD, Node("n1", 2.0), Node("n2", 2.0)]
    with pytest.raises(ResourceError) as e:
        check_train(nodes, 2, 1.5)
    msg = str(e.value)
    assert "no CPU would be left for Ray Data" in msg
    assert "train.num_workers=2 x train.cpus_per_worker=1.5 CPU" in msg
    assert "n1: 1 worker(s), 0.5 CPU left" in msg and "n2: 1 worker(s), 0.5 CPU left" in msg
    assert "needs 1 CPU on one node" in msg
    assert "train.cpus_per_worker=1" in msg  # the largest value that works: both workers on one node
    check_train(nodes, 2, 1.0)  # ... and it does: n2 keeps 2 CPUs for Data
    check_train([HEAD, Node("n1", 3.0), Node("n2", 3.0)], 2, 2.0)  # the measured passing setup


def test_train_workers_that_fit_nowhere_fail():
    with pytest.raises(ResourceError, match=r"only 1 fit on this cluster's nodes \(head: 0 CPU, n1: 4 CPU\)"):
        check_train([HEAD, Node("n1", 4.0)], 2, 3.0)
    with pytest.raises(ResourceError, match="train.cpus_per_worker=1 CPU \\+ 1 GPU, and only 1 fit"):
        check_train([Node("g", 16.0, 1.0)], 2, 1.0, gpus_per_worker=1.0)


def test_a_single_node_cluster_the_train_workers_fill_suggests_fewer_cpus_or_workers():
    with pytest.raises(ResourceError, match=r"Fix: train\.cpus_per_worker=1\.5 or train\.num_workers=1"):
        check_train([Node("local", 4.0)], 2, 2.0)


def test_serve_replicas_that_cannot_be_placed_fail_and_zero_replicas_pass():
    nodes = [HEAD, Node("n1", 3.0), Node("n2", 3.0)]
    check_serve(nodes, 2, 1.0)
    check_serve(nodes, 0, 64.0)  # scale-from-zero: nothing to place yet
    with pytest.raises(ResourceError) as e:
        check_serve(nodes, 1, 4.0)
    assert str(e.value).startswith("the Serve replicas cannot be placed: serve.min_replicas=1 x serve.num_cpus=4, "
                                   "and only 0 fit on this cluster's nodes (head: 0 CPU, n1: 3 CPU, n2: 3 CPU)")
    assert "lower serve.num_cpus or serve.min_replicas" in str(e.value)
    with pytest.raises(ResourceError, match="serve.num_gpus=1"):
        check_serve(nodes, 1, 1.0, gpus=1.0)
