"""The text track's params sections: text_data ... text_task_evaluate (validated on load)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline_lib.core.config import _SHA256, CoreParams, GRPOParams, TrainParams, _check

TextSource = Literal["embedded", "url", "folder"]


TokenizerKind = Literal["char", "bpe"]


NGramMethod = Literal["kneser_ney", "add_k"]


LMObjective = Literal["ar", "mdm"]


HparamsMode = Literal["manual", "auto"]


@dataclass(frozen=True)
class TextDataParams:
    """The text track's corpus, split and tokenizer (see `pipeline_lib.text.data.corpus`).

    `embedded` is the English documentation CPython ships (`pydoc_data.topics`); `url` a plain-text file
    checked against `sha256`; `folder` every `*.txt` under `path`. The last `val_fraction` of the text
    (cut at a line break) is the validation split; the tokenizer is fitted on the training part only.
    """

    source: TextSource = "embedded"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    val_fraction: float = 0.1
    tokenizer: TokenizerKind = "bpe"
    vocab_size: int = 1024

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction <= 0.5, "text_data.val_fraction", self.val_fraction, "must be in (0, 0.5]")
        _check(self.vocab_size >= 257 or self.tokenizer == "char", "text_data.vocab_size", self.vocab_size,
               "must be >= 257 for a byte-level BPE (256 bytes and at least one merge)")
        if self.source == "url":
            _check(bool(self.url), "text_data.url", self.url, "is required with text_data.source='url'")
            _check(bool(self.sha256 and _SHA256.fullmatch(self.sha256)), "text_data.sha256", self.sha256,
                   "is required with text_data.source='url': the file's sha256 as 64 hex digits")
        if self.source == "folder":
            _check(bool(self.path), "text_data.path", self.path, "is required with text_data.source='folder'")
        used = {"url": ("url", "sha256"), "folder": ("path",), "embedded": ()}[self.source]
        for name in ("url", "sha256", "path"):
            _check(name in used or getattr(self, name) is None, f"text_data.{name}", getattr(self, name),
                   f"is not used with text_data.source={self.source!r}; set it to null")


@dataclass(frozen=True)
class TextMoEParams:
    """DeepSeek-V3's mixture-of-experts feed-forward for the text transformer (`pipeline_lib.text.models.moe`).

    Each token goes through `shared_experts` always and through `top_k` of `routed_experts` SwiGLU experts picked
    by sigmoid affinities plus a per-expert bias; the bias only picks, it never weights. After each optimizer step
    the bias moves by `bias_update_speed` (gamma) toward balance: up for an expert below the mean load, down for
    one above it (auxiliary-loss-free balancing). `groups` > 1 limits each token to the `topk_groups` best groups
    of experts (scored by their top-2 affinities). `balance_loss_alpha` > 0 adds the complementary sequence-wise
    balance loss. The first `dense_layers` blocks keep the dense feed-forward. `expert_hidden` null sizes an
    expert so that a token's activated experts hold about the dense feed-forward's parameters.
    """

    enabled: bool = False
    routed_experts: int = 8
    shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int | None = None
    groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    bias_update_speed: float = 1.0e-3
    balance_loss_alpha: float = 0.0
    dense_layers: int = 0

    def __post_init__(self) -> None:
        key = "text_model.moe."
        for name in ("routed_experts", "top_k", "groups", "topk_groups"):
            _check(getattr(self, name) >= 1, key + name, getattr(self, name), "must be a positive integer")
        for name in ("shared_experts", "dense_layers"):
            _check(getattr(self, name) >= 0, key + name, getattr(self, name), "must be an integer >= 0")
        if self.expert_hidden is not None:
            _check(self.expert_hidden >= 1, key + "expert_hidden", self.expert_hidden,
                   "must be a positive integer or null (sized from d_model)")
        _check(self.routed_experts % self.groups == 0, key + "groups", self.groups,
               f"must divide {key}routed_experts={self.routed_experts}")
        per_group = self.routed_experts // self.groups
        _check(self.groups == 1 or per_group >= 2, key + "groups", self.groups,
               "must leave at least 2 experts per group (a group is scored by its top-2 affinities)")
        _check(self.topk_groups <= self.groups, key + "topk_groups", self.topk_groups,
               f"must be <= {key}groups={self.groups}")
        _check(self.top_k <= self.topk_groups * per_group, key + "top_k", self.top_k,
               f"must be <= the {self.topk_groups * per_group} experts of the kept groups "
               f"({key}topk_groups x routed_experts / groups)")
        _check(self.route_scale > 0, key + "route_scale", self.route_scale, "must be > 0")
        _check(self.bias_update_speed >= 0, key + "bias_update_speed", self.bias_update_speed,
               "must be >= 0 (0: no bias update)")
        _check(self.balance_loss_alpha >= 0, key + "balance_loss_alpha", self.balance_loss_alpha,
               "must be >= 0 (0: no sequence-wise balance loss)")


@dataclass(frozen=True)
class TextModelParams:
    """The text track's transformer (pre-norm, RoPE, SwiGLU), shared by both objectives; `moe` turns its
    feed-forward layers into DeepSeek-V3 mixtures of experts."""

    d_model: int = 96
    n_layer: int = 2
    n_head: int = 3
    seq_len: int = 64
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, while training only
    moe: TextMoEParams = dataclasses.field(default_factory=TextMoEParams)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "seq_len"):
            _check(getattr(self, name) >= 1, f"text_model.{name}", getattr(self, name), "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "text_model.dropout", self.dropout, "must be in [0, 1)")
        _check(self.d_model % self.n_head == 0 and (self.d_model // self.n_head) % 2 == 0, "text_model.n_head",
               self.n_head, f"must divide text_model.d_model={self.d_model} into heads of even size (RoPE)")
        _check(not self.moe.enabled or self.moe.dense_layers < self.n_layer, "text_model.moe.dense_layers",
               self.moe.dense_layers, f"must be below text_model.n_layer={self.n_layer} (no layer would be a "
               "mixture of experts)")


@dataclass(frozen=True)
class TextNGramParams:
    """The n-gram baseline: interpolated Kneser-Ney or add-k over token ids."""

    order: int = 5
    method: NGramMethod = "kneser_ney"
    discount: float = 0.75
    k: float = 0.01

    def __post_init__(self) -> None:
        _check(self.order >= 1, "text_ngram.order", self.order, "must be a positive integer")
        _check(0 < self.discount < 1, "text_ngram.discount", self.discount, "must be in (0, 1)")
        _check(self.k > 0, "text_ngram.k", self.k, "must be > 0")


@dataclass(frozen=True)
class LMTrainParams(TrainParams):
    """What training either language model takes beyond the base trainer's keys: the defaults of the text
    track's transformers, and `mdm_eps`, the smallest masking probability of the LLaDA objective."""

    batch_size: int = 16
    base_lr: float = 4.0e-2
    warmup_epochs: float = 0.1
    weight_decay: float = 0.1
    adam_beta2: float = 0.99
    clip_grad: float | None = 1.0
    mdm_eps: float = 1.0e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.mdm_eps < 1, f"{self.section}.mdm_eps", self.mdm_eps, "must be in (0, 1)")


@dataclass(frozen=True)
class TextPretrainParams(LMTrainParams):
    """Language-model pretraining of the transformer: `ar` (next token) or `mdm` (LLaDA masked diffusion).

    An epoch is one pass over the training tokens in windows of `text_model.seq_len`; `batch_size` counts
    windows. `mtp_depth` > 0 trains DeepSeek-V3's multi-token prediction modules beside an `ar` model (weight
    `mtp_weight`; `mdm` predicts every masked position at once and has none); they are not exported. `hparams:
    auto` replaces `batch_size` and the lr by DeepSeek LLM's compute-budget laws (`pipeline_lib.text.hparams`) at
    `compute_budget` FLOPs (null: the run's own, FLOPs per token x training tokens).
    """

    section: ClassVar[str] = "text_pretrain"

    epochs: int = 6
    mtp_depth: int = 0
    mtp_weight: float = 0.3
    hparams: HparamsMode = "manual"
    compute_budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mtp_depth >= 0, "text_pretrain.mtp_depth", self.mtp_depth, "must be an integer >= 0 (0: off)")
        _check(self.mtp_weight > 0, "text_pretrain.mtp_weight", self.mtp_weight, "must be > 0")
        if self.compute_budget is not None:
            _check(self.hparams == "auto", "text_pretrain.compute_budget", self.compute_budget,
                   "is only read with text_pretrain.hparams='auto'; set it to null")
            _check(self.compute_budget > 0, "text_pretrain.compute_budget", self.compute_budget,
                   "must be > 0 FLOPs, or null (the run's own: FLOPs per token x training tokens)")


@dataclass(frozen=True)
class TextEvaluateParams:
    """Validation scoring and samples of the text track's language models."""

    mdm_samples: int = 4
    prompt_tokens: int = 16
    sample_tokens: int = 100
    temperature: float = 0.8
    block_length: int = 16

    def __post_init__(self) -> None:
        for name in ("mdm_samples", "prompt_tokens", "sample_tokens", "block_length"):
            _check(getattr(self, name) >= 1, f"text_evaluate.{name}", getattr(self, name),
                   "must be a positive integer")
        _check(self.temperature >= 0, "text_evaluate.temperature", self.temperature, "must be >= 0 (0: greedy)")


TaskSource = Literal["generate", "jsonl"]


TaskKind = Literal["addition", "reversal", "countdown"]


TaskChecker = Literal["auto", "exact", "numeric", "countdown"]


TextReward = Literal["accuracy", "format", "combined"]


Aggregation = Literal["token", "sample"]


@dataclass(frozen=True)
class TextTaskParams:
    """The verifiable task the language models are finetuned on and post-trained against
    (`pipeline_lib.text.data.tasks`).

    `generate` draws `train_size` + `rl_size` + `test_size` distinct prompts of `kind` with `seed` (options:
    `digits` for addition, `min_len`/`max_len` for reversal, `max_number` for countdown); `jsonl` reads the three
    files (one ``{"prompt": ..., "answer": ...}`` per line) and needs a declared `checker`. A completion is the
    answer in ``<answer>...</answer>`` tags and an end-of-sequence token, at most `answer_tokens` tokens.
    """

    source: TaskSource = "generate"
    kind: TaskKind = "addition"
    digits: int = 2
    min_len: int = 3
    max_len: int = 8
    max_number: int = 20
    train_size: int = 4000
    rl_size: int = 1000
    test_size: int = 512
    train_path: str | None = None
    rl_path: str | None = None
    test_path: str | None = None
    checker: TaskChecker = "auto"
    answer_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("train_size", "rl_size", "test_size", "answer_tokens"):
            _check(getattr(self, name) >= 1, f"text_task.{name}", getattr(self, name), "must be a positive integer")
        for name in ("train_path", "rl_path", "test_path"):
            value = getattr(self, name)
            if self.source == "jsonl":
                _check(bool(value), f"text_task.{name}", value, "is required with text_task.source='jsonl'")
            else:
                _check(value is None, f"text_task.{name}", value,
                       "is only read with text_task.source='jsonl'; set it to null")
        _check(self.source == "generate" or self.checker != "auto", "text_task.checker", self.checker,
               "must be declared (exact, numeric or countdown) with text_task.source='jsonl'")


@dataclass(frozen=True)
class TextSFTParams(LMTrainParams):
    """Supervised finetuning of a language model on the task's train split: the answer tokens only for `ar`,
    LLaDA's SFT (the prompt never masked) for `mdm`. The from-scratch baseline has the same budget."""

    section: ClassVar[str] = "text_sft"

    epochs: int = 4


@dataclass(frozen=True)
class TextRLParams(GRPOParams):
    """GRPO of a finetuned language model on the task's `rl` split against a rule reward (`losses.grpo`).

    `batch_size` counts prompts; each gets `group_size` completions sampled at `temperature` (`mdm`: LLaDA's
    sampler in blocks of `block_length`). `reward`: `accuracy` (1 right), `format` (1 well formed) or
    `combined` (TinyZero: 0 malformed, `format_score` well formed but wrong, 1 right). For `mdm` the
    log-probabilities are d1's one-pass estimate, each prompt token masked with `prompt_mask_prob`.
    """

    section: ClassVar[str] = "text_rl"

    epochs: int = 3
    batch_size: int = 16
    base_lr: float = 4.0e-3
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.99
    clip_grad: float | None = 1.0
    block_length: int = 8
    reward: TextReward = "combined"
    format_score: float = 0.1
    aggregation: Aggregation = "token"
    prompt_mask_prob: float = 0.15
    samples_every: int = 20
    log_every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.block_length >= 1, "text_rl.block_length", self.block_length, "must be a positive integer")
        _check(0 <= self.format_score < 1, "text_rl.format_score", self.format_score,
               "must be in [0, 1) (a right answer earns 1)")
        _check(0 <= self.prompt_mask_prob < 1, "text_rl.prompt_mask_prob", self.prompt_mask_prob, "must be in [0, 1)")
        _check(self.samples_every >= 1, "text_rl.samples_every", self.samples_every, "must be a positive integer")


@dataclass(frozen=True)
class TextTaskEvaluateParams:
    """Test-split scoring of the task models: greedy exact match and format rate, and pass@k from `pass_k`
    samples per prompt at `temperature` (`mdm`: LLaDA's low-confidence sampler in blocks of `block_length`)."""

    pass_k: int = 4
    temperature: float = 1.0
    block_length: int = 8

    def __post_init__(self) -> None:
        for name in ("pass_k", "block_length"):
            _check(getattr(self, name) >= 1, f"text_task_evaluate.{name}", getattr(self, name),
                   "must be a positive integer")
        _check(self.temperature > 0, "text_task_evaluate.temperature", self.temperature,
               "must be > 0 (pass@k needs distinct samples)")


@dataclass(frozen=True)
class TextParams(CoreParams):
    """The text track's view of `params.yaml`: the core sections and the text_* sections."""

    text_data: TextDataParams = dataclasses.field(default_factory=TextDataParams)
    text_ngram: TextNGramParams = dataclasses.field(default_factory=TextNGramParams)
    text_model: TextModelParams = dataclasses.field(default_factory=TextModelParams)
    text_pretrain: TextPretrainParams = dataclasses.field(default_factory=TextPretrainParams)
    text_evaluate: TextEvaluateParams = dataclasses.field(default_factory=TextEvaluateParams)
    text_task: TextTaskParams = dataclasses.field(default_factory=TextTaskParams)
    text_sft: TextSFTParams = dataclasses.field(default_factory=TextSFTParams)
    text_rl: TextRLParams = dataclasses.field(default_factory=TextRLParams)
    text_task_evaluate: TextTaskEvaluateParams = dataclasses.field(default_factory=TextTaskEvaluateParams)
