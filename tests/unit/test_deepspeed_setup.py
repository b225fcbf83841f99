"""DeepSpeed on CPU: the training workers skip the shared-memory comm op's JIT build (minutes of g++ in
every fresh environment, used only by tensor-parallel inference)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_skipping_the_shm_comm_op_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from train.deepspeed_setup import SHM_COMM_OP, skip_shm_comm_build

    assert SHM_COMM_OP in deepspeed.ops.__compatible_ops__  # the op DeepSpeed would build on CPU
    skip_shm_comm_build()
    assert build_shm_op() is None  # DeepSpeed's own check: no op, torch.distributed (gloo) does the reducing
    assert list(tmp_path.iterdir()) == []  # and nothing was compiled
