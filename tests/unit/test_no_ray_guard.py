"""tests/unit/conftest.py: a unit test that starts or joins Ray fails, whichever way it does it."""

from __future__ import annotations

import pytest


def test_starting_or_joining_ray_fails_a_unit_test() -> None:
    import ray
    from ray.cluster_utils import Cluster

    with pytest.raises(pytest.fail.Exception, match="unit tests run without Ray"):
        ray.init(address="local", num_cpus=1)
    with pytest.raises(pytest.fail.Exception, match="ray.init"):
        ray.put(1)  # Ray's auto-init
    with pytest.raises(pytest.fail.Exception, match="a Ray node"):
        Cluster(initialize_head=True)
    assert not ray.is_initialized()
