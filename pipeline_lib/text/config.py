"""The text track's params sections: text_data ... text_task_evaluate (validated on load)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline_lib.core.config import _SHA256, CoreParams, GRPOParams, Section, TrainParams, bounded, unbounded

TextSource = Literal["embedded", "url", "folder", "stdlib"]


TokenizerKind = Literal["char", "bpe"]


NGramMethod = Literal["kneser_ney", "add_k"]


LMObjective = Literal["ar", "mdm"]


HparamsMode = Literal["manual", "auto"]


MDMInit = Literal["scratch", "ar"]


@dataclass(frozen=True)
class TextDataParams(Section):
    """The text track's corpus, split and tokenizer (see `pipeline_lib.text.data.corpus`).

    `embedded` is the English documentation CPython ships (`pydoc_data.topics`); `url` a plain-text file
    checked against `sha256`; `folder` every `*.txt` under `path`; `stdlib` the running Python's standard library
    source (its `*.py` files; `modules` keeps only the named top-level modules and packages, null all of them).
    The last `val_fraction` of the text (cut at a line break) is the validation split; the tokenizer is fitted on
    the training part only.
    """

    section: ClassVar[str] = "text_data"

    source: TextSource = "embedded"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    modules: list[str] | None = None
    val_fraction: float = bounded(0.1, "(0, 0.5]")
    tokenizer: TokenizerKind = "bpe"
    vocab_size: int = unbounded(1024, "a byte-level BPE needs >= 257: checked in __post_init__ with tokenizer")

    def __post_init__(self) -> None:
        super().__post_init__()
        source = self.dotted("source")
        self.require(self.vocab_size >= 257 or self.tokenizer == "char", "vocab_size",
                     "must be >= 257 for a byte-level BPE (256 bytes and at least one merge)")
        if self.source == "url":
            self.require(bool(self.url), "url", f"is required with {source}='url'")
            self.require(bool(self.sha256 and _SHA256.fullmatch(self.sha256)), "sha256",
                         f"is required with {source}='url': the file's sha256 as 64 hex digits")
        if self.source == "folder":
            self.require(bool(self.path), "path", f"is required with {source}='folder'")
        used = {"url": ("url", "sha256"), "folder": ("path",), "embedded": (), "stdlib": ("modules",)}[self.source]
        for name in ("url", "sha256", "path", "modules"):
            self.require(name in used or getattr(self, name) is None, name,
                         f"is not used with {source}={self.source!r}; set it to null")


@dataclass(frozen=True)
class TextMoEParams(Section):
    """DeepSeek-V3's mixture-of-experts feed-forward for the text transformer (`pipeline_lib.text.models.moe`).

    Each token goes through `shared_experts` always and through `top_k` of `routed_experts` SwiGLU experts picked
    by sigmoid affinities plus a per-expert bias; the bias only picks, it never weights. After each optimizer step
    the bias moves by `bias_update_speed` (gamma) toward balance: up for an expert below the mean load, down for
    one above it (auxiliary-loss-free balancing). `groups` > 1 limits each token to the `topk_groups` best groups
    of experts (scored by their top-2 affinities). `balance_loss_alpha` > 0 adds the complementary sequence-wise
    balance loss. The first `dense_layers` blocks keep the dense feed-forward. `expert_hidden` null sizes an
    expert so that a token's activated experts hold about the dense feed-forward's parameters.
    """

    section: ClassVar[str] = "text_model.moe"

    enabled: bool = False
    routed_experts: int = bounded(8, ">= 1")
    shared_experts: int = bounded(1, ">= 0")
    top_k: int = bounded(2, ">= 1")  # and at most the experts of the kept groups
    expert_hidden: int | None = bounded(None, ">= 1", "sized from d_model")
    groups: int = bounded(1, ">= 1")  # and divides routed_experts into groups of >= 2
    topk_groups: int = bounded(1, ">= 1")  # and <= groups
    route_scale: float = bounded(1.0, "> 0")
    bias_update_speed: float = bounded(1.0e-3, ">= 0", "0: no bias update")
    balance_loss_alpha: float = bounded(0.0, ">= 0", "0: no sequence-wise balance loss")
    dense_layers: int = bounded(0, ">= 0")  # and below n_layer (checked by TextModelParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.routed_experts % self.groups == 0, "groups",
                     f"must divide {self.dotted('routed_experts')}={self.routed_experts}")
        per_group = self.routed_experts // self.groups
        self.require(self.groups == 1 or per_group >= 2, "groups",
                     "must leave at least 2 experts per group (a group is scored by its top-2 affinities)")
        self.require(self.topk_groups <= self.groups, "topk_groups",
                     f"must be <= {self.dotted('groups')}={self.groups}")
        self.require(self.top_k <= self.topk_groups * per_group, "top_k",
                     f"must be <= the {self.topk_groups * per_group} experts of the kept groups "
                     f"({self.dotted('topk_groups')} x routed_experts / groups)")


@dataclass(frozen=True)
class TextModelParams(Section):
    """The text track's transformer (pre-norm, RoPE, SwiGLU), shared by both objectives; `moe` turns its
    feed-forward layers into DeepSeek-V3 mixtures of experts."""

    section: ClassVar[str] = "text_model"

    d_model: int = bounded(96, ">= 1")
    n_layer: int = bounded(2, ">= 1")
    n_head: int = bounded(3, ">= 1")  # and divides d_model into heads of even size
    seq_len: int = bounded(64, ">= 1")
    dropout: float = bounded(0.0, "[0, 1)")  # on embeddings, attention weights and residual branches, in training
    moe: TextMoEParams = dataclasses.field(default_factory=TextMoEParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.d_model % self.n_head == 0 and (self.d_model // self.n_head) % 2 == 0, "n_head",
                     f"must divide {self.dotted('d_model')}={self.d_model} into heads of even size (RoPE)")
        self.moe.require(not self.moe.enabled or self.moe.dense_layers < self.n_layer, "dense_layers",
                         f"must be below {self.dotted('n_layer')}={self.n_layer} (no layer would be a mixture of "
                         "experts)")


@dataclass(frozen=True)
class TextNGramParams(Section):
    """The n-gram baseline: interpolated Kneser-Ney or add-k over token ids."""

    section: ClassVar[str] = "text_ngram"

    order: int = bounded(5, ">= 1")
    method: NGramMethod = "kneser_ney"
    discount: float = bounded(0.75, "(0, 1)")
    k: float = bounded(0.01, "> 0")


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
    mdm_eps: float = bounded(1.0e-3, "(0, 1)")


@dataclass(frozen=True)
class TextPretrainParams(LMTrainParams):
    """Language-model pretraining of the transformer: `ar` (next token) or `mdm` (LLaDA masked diffusion).

    An epoch is one pass over the training tokens in windows of `text_model.seq_len`; `batch_size` counts
    windows. `mtp_depth` > 0 trains DeepSeek-V3's multi-token prediction modules beside an `ar` model (weight
    `mtp_weight`; `mdm` predicts every masked position at once and has none); they are not exported. `hparams:
    auto` replaces `batch_size` and the lr by DeepSeek LLM's compute-budget laws (`pipeline_lib.text.hparams`) at
    `compute_budget` FLOPs (null: the run's own, FLOPs per token x training tokens). `mdm_epochs` (null: `epochs`)
    is the masked model's own length.

    `mdm_init: ar` starts `mdm` from the trained `ar` model (DiffuGPT's adaptation, Gong et al. 2025): its weights,
    a MASK embedding at the mean of the token embeddings, the AR layout kept (`TransformerLM.shift`: position i
    predicts token i + 1, the first position is context) and the attention annealed from causal to bidirectional
    over the first `mdm_anneal_epochs` (each query reads each later key with a probability rising linearly from 0
    to 1). `scratch` trains it from fresh weights.
    """

    section: ClassVar[str] = "text_pretrain"

    epochs: int = 6
    mtp_depth: int = bounded(0, ">= 0", "0: off")
    mtp_weight: float = bounded(0.3, "> 0")
    hparams: HparamsMode = "manual"
    compute_budget: float | None = bounded(None, "> 0",
                                           "in FLOPs; null: the run's own, FLOPs per token x training tokens")
    mdm_epochs: int | None = bounded(3, ">= 1", "null: epochs")
    mdm_init: MDMInit = "ar"
    mdm_anneal_epochs: float = bounded(0.5, ">= 0", "read only with mdm_init 'ar'; 0: bidirectional at once")

    def for_objective(self, objective: str) -> TextPretrainParams:
        """The section `objective` trains with: `mdm` takes `mdm_epochs` as its epochs when set."""
        if objective != "mdm" or self.mdm_epochs is None:
            return self
        return dataclasses.replace(self, epochs=self.mdm_epochs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.compute_budget is None or self.hparams == "auto", "compute_budget",
                     f"is only read with {self.dotted('hparams')}='auto'; set it to null")
        epochs = self.mdm_epochs if self.mdm_epochs is not None else self.epochs
        self.require(self.mdm_init != "ar" or self.mdm_anneal_epochs <= epochs, "mdm_anneal_epochs",
                     f"must be at most the masked model's {epochs} epochs (mdm_epochs, or epochs when null): the "
                     "model would never read bidirectionally")


@dataclass(frozen=True)
class TextEvaluateParams(Section):
    """Validation scoring and samples of the text track's language models."""

    section: ClassVar[str] = "text_evaluate"

    mdm_samples: int = bounded(4, ">= 1")
    prompt_tokens: int = bounded(16, ">= 1")
    sample_tokens: int = bounded(100, ">= 1")
    temperature: float = bounded(0.8, ">= 0", "0: greedy")
    block_length: int = bounded(16, ">= 1")


TaskSource = Literal["generate", "jsonl"]

# The task options only the chosen kind reads; `pipeline_lib.text.data.tasks` checks them against that kind.
_OPTION = "read by one task kind and checked for it by pipeline_lib.text.data.tasks"


TaskKind = Literal["addition", "reversal", "countdown"]


TaskChecker = Literal["auto", "exact", "numeric", "countdown"]


TextReward = Literal["accuracy", "format", "combined"]


Aggregation = Literal["token", "sample"]


RLMethod = Literal["grpo", "shuffled", "rft"]


@dataclass(frozen=True)
class TextTaskParams(Section):
    """The verifiable task the language models are finetuned on and post-trained against
    (`pipeline_lib.text.data.tasks`).

    `generate` draws `train_size` + `rl_size` + `test_size` distinct prompts of `kind` with `seed` (options:
    `digits` for addition, `min_len`/`max_len` for reversal, `max_number` for countdown); `jsonl` reads the three
    files (one ``{"prompt": ..., "answer": ...}`` per line) and needs a declared `checker`. A completion is the
    answer in ``<answer>...</answer>`` tags and an end-of-sequence token, at most `answer_tokens` tokens.
    """

    section: ClassVar[str] = "text_task"

    source: TaskSource = "generate"
    kind: TaskKind = "addition"
    digits: int = unbounded(2, _OPTION)
    min_len: int = unbounded(3, _OPTION)
    max_len: int = unbounded(8, _OPTION)
    max_number: int = unbounded(20, _OPTION)
    train_size: int = bounded(6000, ">= 1")
    rl_size: int = bounded(1000, ">= 1")
    test_size: int = bounded(512, ">= 1")
    train_path: str | None = None
    rl_path: str | None = None
    test_path: str | None = None
    checker: TaskChecker = "auto"
    answer_tokens: int = bounded(8, ">= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        jsonl = f"{self.dotted('source')}='jsonl'"
        for name in ("train_path", "rl_path", "test_path"):
            if self.source == "jsonl":
                self.require(bool(getattr(self, name)), name, f"is required with {jsonl}")
            else:
                self.require(getattr(self, name) is None, name, f"is only read with {jsonl}; set it to null")
        self.require(self.source == "generate" or self.checker != "auto", "checker",
                     f"must be declared (exact, numeric or countdown) with {jsonl}")


@dataclass(frozen=True)
class TextSFTParams(LMTrainParams):
    """Supervised finetuning of a language model on the task's train split: the answer tokens only for `ar`,
    LLaDA's SFT (the prompt never masked) for `mdm`. The from-scratch baseline has the same budget.

    `stop_at_accuracy` stops early, at the edge of competence: every `check_every` steps the model completes the
    last `holdout` train examples greedily (they are then held out of training), and SFT ends at the first check
    whose exact match reaches it. The schedule still spans `epochs`. Null trains every epoch.
    """

    section: ClassVar[str] = "text_sft"

    epochs: int = 16
    min_lr: float = 4.0e-2
    stop_at_accuracy: float | None = bounded(0.3, "(0, 1]", "null: train every epoch")
    holdout: int = bounded(256, ">= 1", "read only with stop_at_accuracy")
    check_every: int = bounded(100, ">= 1", "read only with stop_at_accuracy")


@dataclass(frozen=True)
class TextRLParams(GRPOParams):
    """Post-training of a finetuned language model on the task's `rl` split against a rule reward
    (`pipeline_lib.text.rl`).

    `method`: `grpo`, or one of its controls at the same prompts, group size and steps: `shuffled` (GRPO on the
    batch's rewards permuted across the batch: the update without the reward's information) or `rft`
    (rejection-sampling finetuning: the SFT loss on the sampled completions the checker accepts; the GRPO-only
    keys `scale_rewards`, `epsilon`, `epsilon_high`, `num_iterations`, `beta` and `aggregation` are not read).
    `batch_size` counts prompts; each gets `group_size` completions sampled at `temperature` (`mdm`: LLaDA's
    sampler in blocks of `block_length`). `reward`: `accuracy` (1 right), `format` (1 well formed) or
    `combined` (TinyZero: 0 malformed, `format_score` well formed but wrong, 1 right). For `mdm` the
    log-probabilities are d1's one-pass estimate, each prompt token masked with `prompt_mask_prob`, which d1 uses
    only to vary the estimate between a batch's inner updates: with `num_iterations` 1 it must be 0. Training
    happens only when at least `min_signal` of the probe's groups got unequal rewards; below that the SFT weights
    pass through unchanged, as GRPO's advantages would be almost all 0 (0: always train).
    """

    section: ClassVar[str] = "text_rl"

    method: RLMethod = "grpo"
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2.5e-4
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.99
    clip_grad: float | None = 1.0
    block_length: int = bounded(4, ">= 1")
    min_signal: float = bounded(0.1, "[0, 1]", "0: always train")
    reward: TextReward = "combined"
    format_score: float = bounded(0.1, "[0, 1)", "a right answer earns 1")
    aggregation: Aggregation = "token"
    prompt_mask_prob: float = unbounded(0.0, "in [0, 1), and 0 with num_iterations 1: checked in __post_init__")
    samples_every: int = bounded(20, ">= 1")
    log_every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0 <= self.prompt_mask_prob < 1, "prompt_mask_prob", "must be in [0, 1)")
        self.require(self.prompt_mask_prob == 0 or self.num_iterations > 1, "prompt_mask_prob",
                     f"must be 0 with {self.dotted('num_iterations')}=1: d1 masks the prompt to vary its one-pass "
                     "estimate between a batch's inner updates, and with one update it only hides prompt tokens "
                     "(an operand of a short prompt) from the log-probs of the one update")


@dataclass(frozen=True)
class TextTaskEvaluateParams(Section):
    """Test-split scoring of the task models: greedy exact match and format rate, and pass@k from `pass_k`
    samples per prompt at `temperature` (`mdm`: LLaDA's low-confidence sampler in blocks of `block_length`)."""

    section: ClassVar[str] = "text_task_evaluate"

    pass_k: int = bounded(16, ">= 1")
    temperature: float = bounded(1.0, "> 0", "pass@k needs distinct samples")
    block_length: int = bounded(4, ">= 1")


@dataclass(frozen=True)
class TextCurveParams(Section):
    """The study `text_curve` (studies/dvc.yaml, `pipeline_lib.text.curve`): validation bits per character of each
    line against training time and FLOPs, beside the n-gram's. Each line trains once with the text_pretrain keys for
    its own epochs (in place of `text_pretrain.epochs`): `ar_epochs` for ar, `mdm_epochs` for mdm from fresh weights
    and `mdm_ar_epochs` for mdm adapted from the curve's ar model (null: no such line). Each is scored at `points`
    evenly spaced steps on the first `val_windows` validation windows of `text_model.seq_len` tokens (null: all)."""

    section: ClassVar[str] = "text_curve"

    ar_epochs: int = bounded(2, ">= 1")
    mdm_epochs: int = bounded(1, ">= 1")
    mdm_ar_epochs: int | None = bounded(1, ">= 1", "null: no mdm-from-ar line")
    points: int = bounded(8, ">= 1")
    val_windows: int | None = bounded(600, ">= 1", "null: every validation window")


@dataclass(frozen=True)
class TextRLClaimParams(Section):
    """The study `text_rl_claim` (studies/dvc.yaml, `pipeline_lib.text.rl_claim`): for each of `seeds` and
    `objectives`, SFT with the text_sft keys from the pretrained model for the objectives in `pretrained` and from
    fresh weights for the others, then GRPO and its two controls (text_rl's methods) from that model with the
    text_rl keys for `rl_epochs` epochs, each scored on test as text_task_evaluate scores; `jobs` cells at a time,
    the cores shared among them."""

    section: ClassVar[str] = "text_rl_claim"

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4])
    objectives: list[LMObjective] = dataclasses.field(default_factory=lambda: ["ar", "mdm"])
    pretrained: list[LMObjective] = dataclasses.field(default_factory=lambda: ["ar"])
    rl_epochs: int = bounded(3, ">= 1")
    jobs: int = bounded(2, ">= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), "seeds",
                     "must list at least 2 distinct seeds (an interval needs two)")
        self.require(all(0 <= seed < 2**32 for seed in self.seeds), "seeds", "must be integers in [0, 2**32)")
        self.require(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives), "objectives",
                     "must list ar, mdm or both, each once")
        self.require(len(set(self.pretrained)) == len(self.pretrained), "pretrained", "must list each objective once")


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
    text_curve: TextCurveParams = dataclasses.field(default_factory=TextCurveParams)
    text_rl_claim: TextRLClaimParams = dataclasses.field(default_factory=TextRLClaimParams)
