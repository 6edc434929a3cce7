"""DVC stage `text_evaluate`: validation bits per character of the n-gram, AR and MDM models, side by side.

Usage: python -m stages.text_evaluate --params params.yaml --data data/text/prepared --ngram metrics/text/ngram.json
           --model ar=models/text/ar --model mdm=models/text/mdm --metrics metrics/text/evaluate.json
The masked-diffusion figure is an upper bound (`bpc_bound`); a sample of each model goes to MLflow as text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, named_folders, one_line_errors, run_stage, stage_parser
from pipeline_lib.core.tracking import Tracker, write_json_atomic
from pipeline_lib.params import Params, load_params
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.evaluate import check_inputs, run_text_evaluate


def main() -> None:
    parser = stage_parser(__doc__, "data")
    parser.add_argument("--ngram", type=Path, required=True, help="the n-gram stage's metrics file")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a trained LM")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    with one_line_errors("text_evaluate"):
        models = named_folders(args.model, "--model")
    run_stage(Stage(
        "text_evaluate", load_params, logged=lambda params: flatten(params.text_evaluate, prefix="text_evaluate."),
        check=lambda params: check_inputs(params, args.data, models),  # params the text and the models decide
        inputs=lambda _: {"text": read_text_meta(args.data)["sha256"]["val.bin"]},
        upstream={f"text_pretrain_{name}": folder for name, folder in models.items()},
        run=lambda params, tracker, _: evaluate(params, tracker, args.data, args.ngram, models, args.metrics),
        report=lambda summary: "validation bits per character: " + ", ".join(
            f"{name} {values.get('bpc', values.get('bpc_bound')):.4f}" for name, values in summary.items()
            if name != "gain"),
    ), args.params)


def evaluate(params: Params, tracker: Tracker, data: Path, ngram: Path, models: dict[str, Path],
             metrics: Path) -> dict[str, Any]:
    summary = run_text_evaluate(params, data, json.loads(ngram.read_text())["bpc"], models, tracker)
    write_json_atomic(metrics, summary)
    return summary


if __name__ == "__main__":
    main()
