"""Unit tests run without Ray (DESIGN.md section 4): a test that starts a Ray cluster, or joins one,
fails here with a message saying where it belongs (tests/integration, which shares one cluster)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        # pytest.fail raises an OutcomeException (a BaseException): code under test that catches
        # Exception cannot swallow it.
        pytest.fail(f"a unit test started Ray ({what}): unit tests run without Ray; put this test in "
                    f"tests/integration, which shares one local cluster")
    return refuse


@pytest.fixture(autouse=True)
def no_ray() -> Iterator[None]:
    """Every way a test process starts or joins Ray goes through one of these: ``ray.init`` (also
    called by Ray Data's and Serve's auto-init) and the node a local cluster (``ray.init``,
    ``ray.cluster_utils.Cluster``) starts."""
    import ray
    import ray._private.node
    import ray._private.worker

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", _refuse("ray.init"))
        mp.setattr(ray._private.worker, "init", _refuse("ray.init"))
        mp.setattr(ray._private.node.Node, "__init__", _refuse("a Ray node"))
        yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
