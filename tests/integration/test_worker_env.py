"""What every Ray worker runs with (embsum.runtime.PROCESS_ENV): Arrow's freed memory goes back to
the system instead of staying in the worker for as long as it lives."""

from __future__ import annotations

import sys

import pytest

ARROW_MB = 320  # one Arrow allocation of this size, freed again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_ray_workers_give_freed_arrow_memory_back(ray_cluster) -> None:
    import ray

    from embsum.runtime import PROCESS_ENV

    def after_free(arrow_mb: int) -> dict[str, float | str]:
        """In a Ray worker (defined here: pickled by value, the test module is not importable there):
        RSS before, while holding and after freeing ``arrow_mb`` of Arrow memory."""
        import numpy as np
        import pyarrow as pa

        def rss_mb() -> float:
            with open("/proc/self/status") as f:
                return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

        base = rss_mb()
        parts = [pa.array(np.arange(i, i + arrow_mb * 2**20 // 64, dtype=np.int64)) for i in range(8)]
        whole = pa.concat_arrays(parts)  # Arrow's pool allocates arrow_mb here
        del parts
        held = rss_mb()
        assert whole.nbytes >= arrow_mb * 2**20
        del whole
        return {"pool": pa.default_memory_pool().backend_name, "base": base, "held": held, "after": rss_mb()}

    r = ray.get(ray.remote(after_free).remote(ARROW_MB))
    assert r["pool"] == PROCESS_ENV["ARROW_DEFAULT_MEMORY_POOL"] == "system", r
    assert r["held"] - r["base"] >= 0.8 * ARROW_MB, f"the allocation was not resident: {r}"
    assert r["after"] - r["base"] <= 0.2 * ARROW_MB, f"the worker kept Arrow's freed memory: {r}"
