"""DeepSpeed config as data: read the JSON/YAML file named by train.deepspeed_config and fill its
'auto' values from the run config, so batch size, clipping and precision have one source of truth."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from embsum.config import Config


def resolve_precision(cfg: Config) -> str:
    """'auto' -> bf16 on GPU (T5 overflows in fp16), fp32 on CPU. fp16 is refused by the config."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if cfg.train.use_gpu else "fp32"
    return p


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op
    (``deepspeed_shm_comm``, g++ -O2 over two C++ files) the first time a process group starts on a
    machine: 2.6 CPU-minutes, 12 minutes of wall time on a busy 2-core machine, in every fresh
    environment (a new pod, a CI clone). Only ``inference_all_reduce`` (tensor-parallel inference) uses
    it; ZeRO training reduces through torch.distributed (gloo) either way. Marking the op incompatible
    makes DeepSpeed skip the build and fall back to gloo, as it does wherever the op cannot build
    (DeepSpeed keeps the probed table in the module so that such edits persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def load_deepspeed_config(cfg: Config) -> dict[str, Any]:
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise ValueError(f"train.deepspeed_config={str(path)!r}: file not found")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"train.deepspeed_config={str(path)!r} is not valid JSON/YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"train.deepspeed_config={str(path)!r}: expected a mapping")
    return raw


def build_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The dict passed to ``deepspeed.initialize(config=...)``."""
    ds = copy.deepcopy(load_deepspeed_config(cfg))
    ds.pop("_comment", None)
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{cfg.train.deepspeed_config}: remove 'optimizer'/'scheduler'; the trainer passes a torch "
                         f"AdamW and a warmup+linear-decay schedule (a DeepSpeed optimizer JIT-builds fused_adam)")
    t = cfg.train
    auto = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": t.grad_clip}
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
        elif ds[k] != v:
            raise ValueError(f"{cfg.train.deepspeed_config}: {k}={ds[k]!r} disagrees with train config ({v!r}); "
                             f"set it to \"auto\" or make them equal")
    ds["train_batch_size"] = t.batch_size * t.grad_accum * world_size
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if t.zero_stage is not None:
        zero["stage"] = t.zero_stage
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={zero.get('stage')!r}: allowed 0, 1, 2, 3")
    precision = resolve_precision(cfg)
    if ds.get("fp16", {}).get("enabled") in (True, "auto") and precision != "fp16":
        ds.pop("fp16")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{cfg.train.deepspeed_config}: fp16 is refused (T5 overflows in fp16); use bf16 on GPU")
    ds["bf16"] = {"enabled": precision == "bf16"}
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
