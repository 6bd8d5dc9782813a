"""Config blocks shared by stage kinds: model, data, training, evaluation.

Each field is documented once, here, next to the field. A key that is set but cannot have an
effect with the other settings (``min_lr_ratio`` with a constant schedule, ``args`` without a
builtin dataset, ...) is an error rather than a silent no-op.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from posttrain.config.base import StrictModel

DataFormat = Literal["auto", "text", "prompt_completion", "messages", "preference", "ranked", "kto", "prompt"]


def _unused(owner: StrictModel, key: str, because: str) -> str:
    return f"{key!r} has no effect {because}; fix: remove {key!r} or change the setting it depends on"


class TinyModelConfig(StrictModel):
    """A small Llama-style model built from scratch (tests, the demo world, benchmarks)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query heads; default = num_heads")
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    init_seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "fix: choose num_heads that divides hidden_size"
            )
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads; fix: change num_kv_heads")
        return self


class LoraConfig(StrictModel):
    """LoRA through PEFT. Present = enabled. With LoRA the DPO reference is the adapter-free model."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    merge_on_save: bool = Field(False, description="save merged full weights instead of the adapter")


class ModelConfig(StrictModel):
    """Where the policy comes from. A stage with ``from:`` inherits its parent's model instead."""

    path: str | None = Field(None, description="local directory or Hugging Face hub id")
    tiny: TinyModelConfig | None = Field(None, description="build a small model from scratch")
    tokenizer: str | None = Field(
        None, description="tokenizer path or hub id (default: path), or 'builtin:demo'"
    )
    chat_template: str | None = Field(
        None, description="'chatml', a path to a .jinja file, or a template string; overrides the tokenizer's"
    )
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path and self.tiny:
            raise ValueError("set either 'path' or 'tiny', not both; fix: remove one of them")
        if self.tiny and not self.tokenizer:
            raise ValueError("a tiny model needs a 'tokenizer'; fix: set tokenizer: builtin:demo or a path")
        if self.revision and not self.path:
            raise ValueError(_unused(self, "revision", "without 'path'"))
        return self


class DataConfig(StrictModel):
    """A dataset: exactly one of a local file, a Hugging Face dataset, a builtin generator, or the
    output of a data stage of the same recipe (``stage: NAME``)."""

    path: str | None = Field(None, description=".jsonl, .json, .parquet, .csv or .txt; relative to the recipe")
    hf: str | None = Field(None, description="Hugging Face dataset name (needs network or a local cache)")
    builtin: str | None = Field(None, description="a generated set, e.g. 'demo.sft'")
    stage: str | None = Field(None, description="the dataset a data stage of this recipe produced")
    split: str | None = Field(None, description="split of an hf or builtin dataset (default train)")
    args: dict[str, Any] = Field(default_factory=dict, description="arguments of a builtin generator")
    format: DataFormat = Field("auto", description="row format; auto detects it from the fields")
    fields: dict[str, str] = Field(
        default_factory=dict, description="rename columns: {our_name: name_in_file}, e.g. {prompt: question}"
    )
    limit: int | None = Field(None, gt=0, description="use only the first N rows")
    on_bad_row: Literal["error", "drop"] = Field(
        "error", description="malformed rows: fail naming file:line, or drop them and report the count"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in ("path", "hf", "builtin", "stage") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"a dataset needs exactly one of path, hf, builtin or stage (got {given or 'none'}); "
                "fix: keep exactly one"
            )
        if self.args and not self.builtin:
            raise ValueError(_unused(self, "args", "without 'builtin'"))
        if self.split and (self.path or self.stage):
            raise ValueError(_unused(self, "split", "with a local 'path' or a 'stage'"))
        return self


class NamedSpec(StrictModel):
    """A registered component by name plus its parameters, e.g. ``{name: dpo, beta: 0.1}``.

    Every key other than the declared fields is a parameter of the named component; the stage
    checks them against its signature (an unknown parameter is an error listing the valid ones).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(description="a registered name, a peer's alias, or 'package.module:object'")

    def params(self) -> dict[str, object]:
        return dict(self.model_extra or {})


class OptimConfig(StrictModel):
    """Optimisation, precision and checkpointing: shared by the offline and online loops."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr (cosine and linear)")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm; null = off")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints; 0 = end only")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, gt=0)
    max_bad_steps: int = Field(3, gt=0, description="abort after this many non-finite steps in a row")
    logits_chunk: int = Field(1024, gt=0, description="tokens per chunk of the vocabulary projection")
    seed: int | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _schedule(self) -> OptimConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both; fix: remove one")
        if self.schedule == "constant" and self.explicitly_set("min_lr_ratio"):
            raise ValueError(_unused(self, "min_lr_ratio", "with schedule: constant"))
        return self


class TrainConfig(OptimConfig):
    """Offline training: optimisation plus batching. Batch sizes count rows (packed rows when
    packing is on)."""

    epochs: float = Field(1.0, gt=0, description="passes over the data (or set max_steps instead)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; replaces epochs")
    global_batch_size: int = Field(32, gt=0, description="rows per optimizer step, over all processes")
    micro_batch_size: int = Field(8, gt=0, description="rows per forward/backward on one process")
    max_length: int = Field(1024, gt=1, description="tokens per row")
    on_overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="rows longer than max_length: cut the end, drop them, or fail"
    )
    max_truncated_share: float = Field(
        0.1, ge=0, le=1, description="fail if more than this share of rows is truncated or dropped"
    )
    packing: bool = Field(False, description="best-fit pack rows; attention never crosses rows")
    shuffle: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.max_steps is not None and self.explicitly_set("epochs"):
            raise ValueError("set epochs or max_steps, not both; fix: remove one")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; fix: make global_batch_size = micro_batch_size x accumulation"
            )
        if self.on_overlong == "error" and self.explicitly_set("max_truncated_share"):
            raise ValueError(_unused(self, "max_truncated_share", "with on_overlong: error"))
        return self


class EvalTaskConfig(StrictModel):
    """One evaluation task run on the stage's output model (tasks and their options:
    docs/evals.md). A field or option the task does not use is an error, reported with its path
    by ``posttrain.evals.base.check_task_config``."""

    task: str = Field(description="task name, e.g. gsm8k, humaneval, ifeval, xstest, win_rate")
    data: DataConfig | None = Field(None, description="the task's data (default: the task's own)")
    limit: int | None = Field(None, gt=0, description="use only the first N rows")
    max_new_tokens: int | None = Field(None, gt=0, description="generation budget (default: the task's own)")
    batch_size: int = Field(64, gt=0, description="rows per forward pass (generation or scoring)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="task-specific settings (sampling n/temperature/k, templates, judge models, ...), "
        "validated by the task's own schema; an unknown option is an error",
    )
