"""DVC stage `text_ngram`: the n-gram baseline, fitted on the training tokens, scored on validation.

Usage: python -m stages.text_ngram --params params.yaml --data data/text/prepared --metrics metrics/text/ngram.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, read_run_record, stage_run, write_json_atomic
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.ngram import NGramLM, bits_per_character


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    try:
        params = load_params(args.params)
        cfg, meta = params.text_ngram, read_text_meta(args.data)
        with stage_run("text_ngram", params, flatten(cfg, prefix="text_ngram."),
                       inputs={"text": meta["sha256"]["train.bin"]},
                       upstream={"text_fetch": read_run_record(args.data).get("run_id", "unknown")}) as run:
            started = time.perf_counter()
            model = NGramLM(cfg.order, meta["vocab_size"], cfg.method, k=cfg.k, discount=cfg.discount)
            model.fit(read_tokens(args.data, "train"))
            fitted = time.perf_counter()
            nats = -model.log_prob_sequence(read_tokens(args.data, "val"))
            summary = {
                "bpc": bits_per_character(nats, meta["num_chars"]["val"]),
                "bits_per_token": bits_per_character(nats, meta["num_tokens"]["val"]),  # the same ratio per token
                "distinct_ngrams": sum(model.distinct_ngrams),
                "fit_seconds": round(fitted - started, 3),
                "score_seconds": round(time.perf_counter() - fitted, 3),
            }
            run.log_metrics(summary)
            write_json_atomic(args.metrics, summary)
    except (ConfigError, DataError, TrackingUnavailable, ValueError) as err:
        sys.exit(f"text_ngram: {err}")
    print(f"text_ngram: {cfg.order}-gram {cfg.method}: validation {summary['bpc']:.4f} bits per character")


if __name__ == "__main__":
    main()
