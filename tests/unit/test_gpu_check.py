"""The prepared GPU check (bench/gpu_check.sh + bench/gpu_check.py) where no GPU is: the script's
syntax and options, the FLOPs/MFU arithmetic, the run config of both modes, and the CPU dry run's
device stage (the same code the GPU run executes, on the CPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import gpu_check as gc

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_script_parses_and_explains_itself() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cpu" in shown and "--find-links" in shown and "MFU" in shown
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", None), ("Some Future GPU", None),
])
def test_peak_from_the_device_name(name: str, peak: float | None) -> None:
    assert gc.peak_tflops(name) == peak


def test_flops_count_every_t5_matmul_once(tmp_path: Path) -> None:
    """Encoder + decoder bodies + the vocabulary projection: for a tied T5 that is every backbone
    parameter exactly once (the embedding counted as the LM head's matmul, not as a lookup)."""
    from embsum.model import EmbSum
    from embsum.tokenization import EmbSumTokenizer

    cfg = gc.check_config(tmp_path, "cpu", steps=6, batch=4, port=18123)
    model = EmbSum.from_config(cfg.model, EmbSumTokenizer.from_config(cfg.model).sos_id, seed=0)
    params = gc.matmul_params(model)
    assert sum(params.values()) == sum(p.numel() for p in model.t5.parameters())
    vocab_rows = model.t5.get_output_embeddings().weight.shape[0]
    assert params["decoder"] > vocab_rows * model.d_model > 0
    pos = gc.positions_per_example(cfg)
    m = cfg.model
    assert pos == {"encoder": m.num_sessions * m.session_tokens + (1 + cfg.data.negatives) * m.content_tokens,
                   "decoder": m.summary_tokens}
    assert gc.flops_per_example({"encoder": 10, "decoder": 3}, {"encoder": 100, "decoder": 7}) == 6 * (1000 + 21)


def test_gpu_config_is_t5_small_bf16_zero2_one_worker_with_gpu_actors(tmp_path: Path) -> None:
    cfg = gc.check_config(tmp_path, "cuda", steps=200, batch=64, port=18124)
    m, t, s = cfg.model, cfg.train, cfg.serve
    assert (m.d_model, m.d_ff, m.num_layers, m.num_decoder_layers, m.num_heads) == (512, 2048, 6, 6, 8)
    assert m.random_init and t.use_gpu and t.num_workers == 1 and t.zero_stage == 2 and t.precision == "bf16"
    assert t.max_steps == 200 and cfg.infer.gpus == 1.0 and s.num_gpus == 1.0
    ds = Path(t.deepspeed_config)  # Ray workers run in other directories: the file must be found from anywhere
    assert ds.is_absolute() and ds.is_file() and ds.name == "zero2.json"
    tiny = gc.check_config(tmp_path, "cpu", steps=6, batch=4, port=18125)
    assert not tiny.train.use_gpu and tiny.train.precision == "fp32" and tiny.serve.num_gpus == 0.0
    assert tiny.model.d_model == gc.TINY_MODEL["d_model"]


def test_throughput_uses_the_windows_after_warmup() -> None:
    hist = {"examples_per_s": [(10, 1.0), (20, 100.0), (30, 50.0)], "tokens_per_s": [(10, 5.0), (20, 1000.0),
                                                                                      (30, 400.0)]}
    got = gc.throughput(hist, window=10, warmup=10, batch=10)
    # windows 20 and 30 (the first ends at the warmup): 100 examples in 1 s, then in 2 s
    assert got["windows"] == 2 and got["timed_seconds"] == pytest.approx(3.0)
    assert got["examples_per_s"] == pytest.approx(200 / 3)
    assert got["tokens_per_s"] == pytest.approx((1000 * 1 + 400 * 2) / 3)
    with pytest.raises(ValueError, match="no logged window after 30 warmup steps"):
        gc.throughput(hist, window=10, warmup=30, batch=10)


def test_device_stage_runs_on_the_cpu() -> None:
    got = gc.stage_device("cpu")
    assert got["name"] == "cpu" and got["fp32_scores_max_abs_diff_vs_cpu"] == 0.0 and got["bf16_backward_finite"]


def test_unknown_stage_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gc.main(["--device", "cpu", "--stages", "device,warp"])
    assert e.value.code == 2 and "unknown stage 'warp'" in capsys.readouterr().err
