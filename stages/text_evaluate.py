"""DVC stage `text_evaluate`: validation bits per character of the n-gram, AR and MDM models, side by side.

Usage: python -m stages.text_evaluate --params params.yaml --data data/text/prepared --ngram metrics/text/ngram.json
           --model ar=models/text/ar --model mdm=models/text/mdm --metrics metrics/text/evaluate.json
The masked-diffusion figure is an upper bound (`bpc_bound`); a sample of each model goes to MLflow as text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, read_run_record, stage_run, write_json_atomic
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.evaluate import check_inputs, run_text_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ngram", type=Path, required=True, help="the n-gram stage's metrics file")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a trained LM")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    try:
        models = {name: Path(folder) for name, _, folder in (item.partition("=") for item in args.model)}
        if not models or not all(models) or Path() in models.values():
            raise ValueError(f"--model {args.model}: give one or more NAME=FOLDER")
        params = load_params(args.params)
        check_inputs(params, args.data, models)  # params the text and the models decide, before any MLflow run
        upstream = {f"text_pretrain_{name}": read_run_record(folder).get("run_id", "unknown")
                    for name, folder in models.items()}
        with stage_run("text_evaluate", params, flatten(params.text_evaluate, prefix="text_evaluate."),
                       inputs={"text": read_text_meta(args.data)["sha256"]["val.bin"]}, upstream=upstream) as run:
            summary = run_text_evaluate(params, args.data, json.loads(args.ngram.read_text())["bpc"], models, run)
            write_json_atomic(args.metrics, summary)
    except (ConfigError, DataError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"text_evaluate: {err}")
    print("text_evaluate: validation bits per character: " + ", ".join(
        f"{name} {values.get('bpc', values.get('bpc_bound')):.4f}" for name, values in summary.items()
        if name != "gain"))


if __name__ == "__main__":
    main()
