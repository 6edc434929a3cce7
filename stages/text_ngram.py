"""DVC stage `text_ngram`: the n-gram baseline, fitted on the training tokens, scored on validation.

Usage: python -m stages.text_ngram --params params.yaml --data data/text/prepared --metrics metrics/text/ngram.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.core.tracking import Tracker, write_json_atomic
from pipeline_lib.params import Params, load_params
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.ngram import NGramLM, bits_per_character


def main() -> None:
    args = stage_parser(__doc__, "data", "metrics").parse_args()
    run_stage(Stage(
        "text_ngram", load_params, logged=lambda params: flatten(params.text_ngram, prefix="text_ngram."),
        inputs=lambda: {"text": read_text_meta(args.data)["sha256"]["train.bin"]}, upstream={"text_fetch": args.data},
        run=lambda params, tracker, _: fit_and_score(params, tracker, args.data, args.metrics),
        report=lambda summary: f"{summary['order']}-gram {summary['method']}: validation {summary['bpc']:.4f} "
                               "bits per character",
    ), args.params)


def fit_and_score(params: Params, tracker: Tracker, data: Path, metrics: Path) -> dict[str, Any]:
    """Fit the n-gram on the training tokens, score it on validation, log and write the metrics."""
    cfg, meta = params.text_ngram, read_text_meta(data)
    started = time.perf_counter()
    model = NGramLM(cfg.order, meta["vocab_size"], cfg.method, k=cfg.k, discount=cfg.discount)
    model.fit(read_tokens(data, "train"))
    fitted = time.perf_counter()
    nats = -model.log_prob_sequence(read_tokens(data, "val"))
    summary = {
        "bpc": bits_per_character(nats, meta["num_chars"]["val"]),
        "bits_per_token": bits_per_character(nats, meta["num_tokens"]["val"]),  # the same ratio per token
        "distinct_ngrams": sum(model.distinct_ngrams),
        "fit_seconds": round(fitted - started, 3),
        "score_seconds": round(time.perf_counter() - fitted, 3),
    }
    tracker.log_metrics(summary)
    write_json_atomic(metrics, summary)
    return {**summary, "order": cfg.order, "method": cfg.method}


if __name__ == "__main__":
    main()
