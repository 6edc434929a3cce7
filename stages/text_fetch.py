"""DVC stage `text_fetch`: read the text corpus, split it, fit the tokenizer on train, store the token ids.

Usage: python -m stages.text_fetch --params params.yaml --out data/text/prepared --cache-dir data/cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, stage_run, write_run_record
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import check_inputs, prepare_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="prepared text folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads are kept")
    args = parser.parse_args()
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        cfg = params.text_data
        check_inputs(cfg)  # the corpus location, before any work and any MLflow run
        with stage_run("text_fetch", params, flatten(cfg, prefix="text_data.")) as run:
            meta = prepare_text(cfg.source, url=cfg.url, sha256=cfg.sha256, path=cfg.path,
                                val_fraction=cfg.val_fraction, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                out_dir=args.out, cache_dir=args.cache_dir)
            run.log_metrics({"vocab_size": meta["vocab_size"],
                             **{f"{split}.num_tokens": n for split, n in meta["num_tokens"].items()},
                             **{f"{split}.num_chars": n for split, n in meta["num_chars"].items()}})
            run.set_tags({"input.source.sha256": meta["source_sha256"], "data.origin": meta["origin"]})
            run.log_artifact(args.out / "meta.json")
            run.log_artifact(args.out / "tokenizer.json")
            write_run_record(args.out / "run.json", run)
    except (ConfigError, DataError, TrackingUnavailable, ValueError) as err:
        sys.exit(f"text_fetch: {err}")
    print(f"text_fetch: {meta['origin']} -> {args.out}: {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, "
          f"train {meta['num_tokens']['train']} tokens, val {meta['num_tokens']['val']} tokens")


if __name__ == "__main__":
    main()
