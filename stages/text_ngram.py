"""DVC stage `text_ngram`: the n-gram baseline, fitted on the training tokens, scored on validation.

Usage: python -m stages.text_ngram --params params.yaml --data data/text/prepared --metrics metrics/text/ngram.json
"""

from __future__ import annotations

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.ngram import run_text_ngram


def main() -> None:
    args = stage_parser(__doc__, "data", "metrics").parse_args()
    run_stage(Stage(
        "text_ngram", load_params, logged=lambda params: flatten(params.text_ngram, prefix="text_ngram."),
        inputs=lambda _: {"text": read_text_meta(args.data)["sha256"]["train.bin"]}, upstream={"text_fetch": args.data},
        run=lambda params, tracker, _: run_text_ngram(params, tracker, args.data, args.metrics),
        report=lambda summary: f"{summary['order']}-gram {summary['method']}: validation {summary['bpc']:.4f} "
                               "bits per character",
    ), args.params)




if __name__ == "__main__":
    main()
