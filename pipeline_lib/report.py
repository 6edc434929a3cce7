"""The headline of both tracks, read from the metrics files: what `dvc metrics show` buries in ~250 columns.

Usage: python -m pipeline_lib.report [--metrics metrics] [--markdown FILE]

Prints one table per headline (vision: SSL against scratch, the pixel baselines and the encoder probes; vision
RL: the post-trained policy against its controls; text: bits per character and the task's exact match) and
writes the same tables as GitHub Markdown to `--markdown` (for a CI job summary). It only reads the JSON files
under `--metrics`: a file or key that is not there yet (a track not reproduced) shows as "—".

Exit status: 0 done, 2 bad input (`--metrics` is not a folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING = "—"


@dataclass(frozen=True)
class Row:
    """One line of a table: its label and the dotted key of each column's number (None: no such number)."""

    label: str
    keys: tuple[str | None, ...]
    signed: bool = False  # a difference: printed with its sign


@dataclass(frozen=True)
class Table:
    """A headline table: its numbers come from one metrics file, relative to the metrics folder.

    `note` is a sentence under the table with a `{}` for each of `note_keys` (dotted keys of the same file); a
    number takes the field's format (`{:+.4f}`), else the shortest exact form (`{}`: 144, 0.1).
    """

    title: str
    file: str
    columns: tuple[str, ...]  # the header, the label column's first
    rows: tuple[Row, ...]
    note: str = ""
    note_keys: tuple[str, ...] = ()
    study: str | None = None  # the study (studies/dvc.yaml) that writes the file; None: the default pipeline


# -- the headline, in one place: a change that adds a metric adds its row here --------------------------------

TEXT_OBJECTIVES = {"ar": "autoregressive (ar)", "mdm": "masked diffusion (mdm)"}
RL_COLUMNS = ("reward_greedy", "accuracy", "coverage", "selective_risk", "nll", "ece")
RL_POLICIES = {
    "finetuned classifier (the reference)": "reference",
    "GRPO post-trained": "post_trained",
    "Bayes rule on the reference": "baselines.bayes_reference",
    "exact expected reward, same budget": "baselines.expected_reward",
    "cross-entropy on rl + Bayes rule": "baselines.cross_entropy_bayes",
}

TASK_MODELS = {"scratch": "scratch + SFT", "sft": "pretrained + SFT", "rl": "+ GRPO"}
TASK_COLUMNS = {"accuracy": "greedy", "pass_at_1": "pass@1", "maj_at_16": "maj@16", "pass_at_16": "pass@16",
                "format_rate": "format"}
CLAIM_PAIRS = {"grpo_minus_shuffled": "GRPO - shuffled reward", "grpo_minus_sft": "GRPO - SFT",
               "grpo_minus_rft": "GRPO - RFT"}
CURVE_MEANS = ("ssl", "semi", "scratch", "pixels_svm", "pixels_label_spreading")
CURVE_PAIRS = ("ssl_minus_scratch", "semi_minus_ssl", "semi_minus_scratch")
CLAIM_COLUMNS = {f"{key}": label for key, label in TASK_COLUMNS.items() if key != "format_rate"}

HEADLINE: tuple[Table, ...] = (
    Table(
        "Vision: test top-1", "evaluate.json", ("model", "top-1"),
        (Row("SSL: finetuned from the pretrained encoder", ("ssl.top1",)),
         Row("semi-supervised: the SSL model trained on with the unlabeled images", ("semi.top1",)),
         Row("scratch: same model and labels, random init", ("scratch.top1",)),
         Row("pixels: logistic regression", ("baselines.pixels_logreg.top1",)),
         Row("pixels: RBF SVM, C and gamma by CV on labeled", ("baselines.pixels_svm.top1",)),
         Row("pixels: LabelSpreading with the unlabeled pool, by CV on labeled",
             ("baselines.pixels_label_spreading.top1",)),
         Row("encoder: kNN", ("encoder.knn_top1",)),
         Row("encoder: linear probe", ("encoder.linear_probe_top1",)),
         Row("SSL gain over scratch", ("gain.top1",), signed=True),
         Row("semi-supervised gain over SSL", ("gain.semi_vs_ssl",), signed=True),
         Row("semi-supervised gain over the pixel SVM", ("gain.semi_vs_pixels_svm",), signed=True),
         Row("SSL gain over the pixel SVM", ("gain.ssl_vs_pixels_svm",), signed=True),
         Row("SSL gain over pixel LabelSpreading", ("gain.ssl_vs_pixels_label_spreading",), signed=True)),
        note="{} labeled images (label fraction {}), {} test images; the pixel SVM's C {}, gamma {}; LabelSpreading's "
             "kernel {}, alpha {}.",
        note_keys=("labels.labeled_images", "labels.label_fraction", "labels.test_images",
                   "baselines.pixels_svm.C", "baselines.pixels_svm.gamma",
                   "baselines.pixels_label_spreading.kernel", "baselines.pixels_label_spreading.alpha"),
    ),
    Table(
        "Vision: test top-1 against the label fraction, paired over the labeled draws (mean [95% interval])",
        "label_curve.json",
        ("labels", "SSL", "semi", "scratch", "pixels: SVM", "pixels: LabelSpreading", "SSL - scratch", "semi - SSL",
         "semi - scratch"),
        tuple(Row(f"{fraction:g}%", (*(f"points.p{fraction:g}.{method}" for method in CURVE_MEANS),
                                     *(f"points.p{fraction:g}.{pair}" for pair in CURVE_PAIRS)))
              for fraction in (1, 2, 5, 10, 25, 50)),
        note="From `dvc repro studies/dvc.yaml:label_curve`, on {} test images: each draw is a labeled set and a "
             "training seed, the same for every model; the pixel methods fit the same labeled images (and "
             "LabelSpreading the unlabeled pool), with their hyperparameters by CV on them.",
        note_keys=("test_images",), study="label_curve",
    ),
    Table(
        "Vision RL: the post-trained policy against its controls (test)", "rl.json",
        ("policy", "reward (greedy)", "accuracy", "coverage", "selective risk", "NLL", "ECE"),
        tuple(Row(label, tuple(f"{prefix}.{key}" for key in RL_COLUMNS)) for label, prefix in RL_POLICIES.items()),
        note="Reward {}, on {} test images. GRPO's gain in greedy reward: {:+.4f} over the reference, {:+.4f} over "
             "the Bayes rule, {:+.4f} over cross-entropy.",
        note_keys=("reward.type", "test_images", "gain.reward_greedy", "gain.reward_greedy_over_bayes",
                   "gain.reward_greedy_over_cross_entropy"),
    ),
    Table(
        "Text: bits per character on the held-out text (lower is better)", "text/evaluate.json",
        ("model", "bits per character"),
        (Row("n-gram baseline", ("ngram.bpc",)),
         Row(TEXT_OBJECTIVES["ar"], ("ar.bpc",)),
         Row(f"{TEXT_OBJECTIVES['mdm']}, an upper bound", ("mdm.bpc_bound",))),
    ),
    Table(
        "Text: the task on its test prompts (one seed)", "text/task.json",
        ("model", *TASK_COLUMNS.values()),
        tuple(Row(f"{objective}: {label}", tuple(f"{kind}_{objective}.{key}" for key in TASK_COLUMNS))
              for objective in TEXT_OBJECTIVES for kind, label in TASK_MODELS.items()),
        note="On {} test prompts: exact match of the greedy completion, and of 16 samples at temperature 1 the mean "
             "(pass@1), the majority vote and whether any is right; format: greedy completions well formed.",
        note_keys=("test_prompts",),
    ),
    Table(
        "Text RL: GRPO against its controls, paired over seeds (test; mean [95% interval])", "text/rl_claim.json",
        ("difference", *CLAIM_COLUMNS.values(), "greedy, worst seed"),
        tuple(Row(f"{objective}: {label}", (*(f"{objective}.differences.{pair}.{key}" for key in CLAIM_COLUMNS),
                                             f"{objective}.differences.{pair}.accuracy.minimum"), signed=True)
              for objective in TEXT_OBJECTIVES for pair, label in CLAIM_PAIRS.items()),
        note="From `dvc repro studies/dvc.yaml:text_rl_claim`: for each seed an SFT model, then GRPO and its controls "
             "from it at the same prompts, group size and steps (shuffled: GRPO on rewards permuted across each batch; "
             "RFT: SFT on the accepted samples). SFT greedy exact match over the seeds: ar {}, mdm {}.",
        note_keys=("ar.sft.accuracy", "mdm.sft.accuracy"), study="text_rl_claim",
    ),
)


# -- reading and formatting -----------------------------------------------------------------------------------

def read_metrics(folder: Path, file: str, study: str | None = None) -> tuple[dict[str, Any], str]:
    """The metrics document `folder/file` and "" when read; {} and why not (missing, unreadable) otherwise."""
    path = folder / file
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        how = "not reproduced yet" if study is None else f"run dvc repro studies/dvc.yaml:{study}"
        return {}, f"{path} not found ({how})"
    except (OSError, ValueError) as err:
        return {}, f"{path} unreadable: {err}"
    return (document, "") if isinstance(document, dict) else ({}, f"{path} unreadable: not a JSON object")


def lookup(document: dict[str, Any], key: str | None) -> Any:
    """The value at dotted `key` (`gain.top1`), or None where any part is missing."""
    value: Any = document
    for part in key.split(".") if key is not None else [None]:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def cell(value: Any, *, signed: bool = False) -> str:
    """A number to 4 decimals (a difference with its sign); an interval (`core.claims.Interval` as a mapping) as
    its mean and [low, high] to 3 (the mean alone where one value left no interval); anything else that is not
    text as MISSING."""
    if isinstance(value, dict) and {"mean", "low", "high"} <= set(value):
        spec = "+.3f" if signed else ".3f"
        numbers = [value[key] for key in ("mean", "low", "high")]
        if not all(isinstance(number, (int, float)) for number in numbers):
            return MISSING
        if any(math.isnan(number) for number in numbers[1:]):  # one seed or draw: a difference with no interval
            return format(numbers[0], spec)
        mean, low, high = (format(number, spec) for number in numbers)
        return f"{mean} [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value if isinstance(value, str) else MISSING
    return f"{value:+.4f}" if signed else f"{value:.4f}"


@dataclass(frozen=True)
class NoteValue:
    """A value in a note: a number in the field's format (default `g`), text as it is, MISSING when absent."""

    value: Any

    def __format__(self, spec: str) -> str:
        if isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            return format(self.value, spec or "g")
        if isinstance(self.value, list) and all(isinstance(v, (int, float)) for v in self.value) and self.value:
            return f"{min(self.value):.3f} to {max(self.value):.3f}"  # a range over seeds
        return MISSING if self.value is None or isinstance(self.value, (dict, list)) else str(self.value)


@dataclass(frozen=True)
class Filled:
    """A table with its cells as text, and the line under it."""

    title: str
    columns: tuple[str, ...]
    cells: list[list[str]]
    note: str


def fill(table: Table, folder: Path) -> Filled:
    """`table` with the numbers of its file under `folder`; MISSING where there are none."""
    document, problem = read_metrics(folder, table.file, table.study)
    cells = [[row.label, *(cell(lookup(document, key), signed=row.signed) for key in row.keys)]
             for row in table.rows]
    note = problem or table.note.format(*(NoteValue(lookup(document, key)) for key in table.note_keys))
    return Filled(table.title, table.columns, cells, note)


def headline(folder: Path) -> list[Filled]:
    """Every HEADLINE table, filled from the metrics folder."""
    return [fill(table, folder) for table in HEADLINE]


def as_text(tables: list[Filled]) -> str:
    """Plain tables for a terminal: labels left-aligned, numbers right-aligned."""
    blocks = []
    for table in tables:
        lines = [table.columns, *table.cells]
        widths = [max(len(line[i]) for line in lines) for i in range(len(table.columns))]
        rendered = ["  ".join([line[0].ljust(widths[0]), *(text.rjust(w) for text, w in zip(line[1:], widths[1:],
                                                                                           strict=True))]).rstrip()
                    for line in lines]
        rendered.insert(1, "  ".join("-" * width for width in widths))
        blocks.append("\n".join([table.title, "", *rendered, *([table.note] if table.note else [])]))
    return "\n\n".join(blocks) + "\n"


def as_markdown(tables: list[Filled]) -> str:
    """The same tables as GitHub Markdown, under one `## Headline` heading."""
    blocks = ["## Headline"]
    for table in tables:
        lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
                 "|" + "|".join([" --- "] + [" ---: "] * (len(table.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(text.replace("|", "\\|") for text in row) + " |" for row in table.cells]
        blocks.append("\n".join(lines + ([f"\n{table.note}"] if table.note else [])))
    return "\n\n".join(blocks) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", type=Path, default=Path("metrics"),
                        help="the metrics folder the pipeline writes (default: metrics)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as GitHub Markdown to this file")
    args = parser.parse_args(argv)
    if not args.metrics.is_dir():
        print(f"error: --metrics {args.metrics}: no such folder (run from the project root, or name the folder "
              "that holds evaluate.json)", file=sys.stderr)
        return 2
    tables = headline(args.metrics)
    print(as_text(tables), end="")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(as_markdown(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
