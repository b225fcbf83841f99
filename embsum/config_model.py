"""The ``model``, ``train`` and ``infer`` sections of the run configuration: the EmbSum model, how Ray
Train + DeepSpeed trains it, and how the batch jobs and predictors run it.

Part of ``embsum.config`` (which re-exports every section; import them from there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from embsum.config_parse import SECTION


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    """The EmbSum model: T5 backbone, session layout, poly-attention heads."""

    backbone: str = Field(
        default="t5-small", description="Hugging Face name or local path of the T5 checkpoint (from_pretrained).")
    random_init: bool = Field(
        default=False, description="Build T5 from the shape fields below with random weights instead of loading "
                                   "backbone (offline demo and tests).")
    tokenizer: str = Field(
        default="", description="Tokenizer name or path; '' = backbone; 'bundled' = the T5 tokenizer shipped in "
                                "embsum.")
    d_model: int = Field(default=512, ge=8, le=16384, description="random_init: hidden size (t5-small: 512).")
    d_kv: int = Field(default=64, ge=4, le=1024, description="random_init: size per attention head (t5-small: 64).")
    d_ff: int = Field(default=2048, ge=8, le=65536, description="random_init: feed-forward size (t5-small: 2048).")
    num_layers: int = Field(default=6, ge=1, le=128, description="random_init: encoder layers (t5-small: 6).")
    num_decoder_layers: int = Field(default=6, ge=1, le=128, description="random_init: decoder layers (t5-small: 6).")
    num_heads: int = Field(default=8, ge=1, le=256, description="random_init: attention heads (t5-small: 8).")
    vocab_size: int = Field(
        default=32128, ge=100, le=1_000_000, description="random_init: vocabulary rows (t5-small: 32128 >= 32100 "
                                                         "tokens).")
    dropout: float = Field(default=0.1, ge=0.0, le=0.9, description="Dropout rate inside T5.")
    sos_token: str = Field(
        default="<extra_id_0>", description="Item start marker; a reserved T5 sentinel, so no vocabulary change (see "
                                            "embsum/tokenization.py).")
    num_sessions: int = Field(default=4, ge=1, le=256, description="G: sessions per user history.")
    items_per_session: int = Field(
        default=5, ge=1, le=256, description="P: items per session; history length H = G * P.")
    session_tokens: int = Field(
        default=128, ge=8, le=4096, description="L: tokens per session (each item gets (L - 1) // P tokens incl. its "
                                                "marker).")
    content_tokens: int = Field(
        default=48, ge=4, le=4096, description="Tokens per candidate item (marker + text + EOS).")
    summary_tokens: int = Field(
        default=48, ge=2, le=1024, description="Max summary tokens (teacher-forced length and generation bound, incl. "
                                               "EOS).")
    summary_no_repeat_ngram: int = Field(
        default=3, ge=0, le=64, description="Summary generation never repeats an n-gram of this size (the standard "
                                            "summarization guard against 'and and and' loops); 0 = off.")
    summary_num_beams: int = Field(
        default=1, ge=1, le=16, description="Beam width of summary generation (1 = greedy). The UPE's global vector "
                                            "is read from the generated summary, so this is part of the model: stored "
                                            "with each version and used by validation, evaluate, embed and serve "
                                            "alike.")
    user_codes: int = Field(default=8, ge=1, le=1024, description="M: user poly-embedding codes.")
    content_codes: int = Field(default=4, ge=1, le=1024, description="N: content poly-embedding codes.")


EmbSumConfig = ModelConfig  # the model section's former name, kept for code written against it


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    """Ray Train + DeepSpeed."""

    num_workers: int = Field(default=2, ge=1, le=4096, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; bf16 by default.")
    cpus_per_worker: float = Field(default=1.0, ge=0.01, le=1024, description="CPUs reserved per worker.")
    deepspeed_config: str = Field(
        default="train/deepspeed/zero2.json", description="DeepSpeed config file (JSON or YAML), relative to the "
                                                          "config file's folder or absolute. Batch, lr and precision "
                                                          "keys are filled in.")
    zero_stage: int | None = Field(
        default=None, ge=0, le=3, description="Overrides the file's zero_optimization.stage (0-3).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="'auto' = bf16 on GPU, fp32 on CPU; fp16 is refused (T5 overflows in fp16).")
    batch_size: int = Field(default=16, ge=1, le=65536, description="Micro-batch of examples per worker.")
    grad_accum: int = Field(default=1, ge=1, le=4096, description="Gradient accumulation steps.")
    lr: float = Field(default=5e-4, ge=1e-8, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    warmup_steps: int = Field(
        default=50, ge=0, le=10_000_000, description="Linear warmup steps, then linear decay to 0 at max_steps.")
    max_steps: int = Field(default=600, ge=1, le=100_000_000, description="Optimizer steps in total.")
    grad_clip: float = Field(default=1.0, ge=0.0, le=1e6, description="Gradient-norm clip (0 = off).")
    summary_weight: float = Field(default=0.05, ge=0.0, le=100.0, description="lambda in L = L_NCE + lambda * L_sum.")
    in_batch_negatives: bool = Field(
        default=True, description="NCE also scores each user against the other examples' candidates in the "
                                  "micro-batch (B*C more negatives, no extra encoding).")
    nce_temperature: float = Field(
        default=0.0, ge=0.0, le=1e6, description="NCE logits are score / t (training only; ranking is unchanged); 0 = "
                                                 "sqrt(d_model).")
    checkpoint_every: int = Field(
        default=200, ge=1, le=100_000_000, description="Save (collectively) every N steps; also at the end.")
    keep_checkpoints: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept, best by validation AUC.")
    eval_batches: int = Field(
        default=20, ge=0, le=1_000_000,
        description="Validation batches per worker and checkpoint: the first eval_batches x eval_batch_size x workers "
                    "validation examples, the same at every checkpoint (0 = no validation).")
    eval_batch_size: int = Field(
        default=0, ge=0, le=65536, description="Validation micro-batch per worker (0 = batch_size). Validation has no "
                                               "backward pass, so a larger batch reads more of the valid set for the "
                                               "same time.")
    log_every: int = Field(default=10, ge=1, le=1_000_000, description="Report metrics every N steps.")
    max_failures: int = Field(
        default=1, ge=-1, le=1000, description="Worker failures a run survives (restart from the latest checkpoint).")
    run_name: str = Field(
        default="", description="Ray Train run name; rerunning a name resumes from its latest checkpoint. '' = a "
                                "fresh timestamped name per run.")
    storage_path: str = Field(
        default="", description="Checkpoint storage (local dir, s3://, NFS); '' = WORKDIR/ray_results. Must be shared "
                                "storage on multi-node clusters.")
    seed: int = Field(default=0, description="Seed for model init and data order.")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="Testing only: rank 1 kills itself once at this step.")


@dataclass(frozen=True, config=SECTION)
class InferConfig:
    """Model inference outside training: the batch jobs (evaluate, embed) and the model batch of every predictor."""

    actors: int = Field(
        default=2, ge=1, le=100000, description="Batch inference (evaluate, embed): model replicas in the Ray Data "
                                                "actor pool.")
    batch_size: int = Field(
        default=64, ge=1, le=65536, description="Rows per model call: batch inference, and the scorer's encodes of "
                                                "unknown users and items.")
    rows_per_call: int = Field(
        default=2048, ge=1, le=10_000_000, description="Batch inference: most rows per actor call (the Ray Data "
                                                       "batch; the model sees batch_size at a time). Fewer, larger "
                                                       "calls cost less per row.")
    cpus: float = Field(default=1.0, ge=0.01, le=1024, description="Batch inference: CPUs per actor.")
    gpus: float = Field(
        default=0.0, ge=0.0, le=64, description="Batch inference: GPUs per actor (e.g. 1 or 0.5 on GPU clusters).")
