"""DVC stage `text_fetch`: read the text corpus, split it, fit the tokenizer on train, store the token ids.

Usage: python -m stages.text_fetch --params params.yaml --out data/text/prepared --cache-dir data/cache
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.core.tracking import Tracker, write_run_record
from pipeline_lib.params import Params, load_params
from pipeline_lib.text.data.corpus import check_inputs, prepare_text


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="prepared text folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads are kept")
    args = parser.parse_args()
    run_stage(Stage(
        "text_fetch", load_params, logged=lambda params: flatten(params.text_data, prefix="text_data."),
        check=lambda params: check_inputs(params.text_data),  # the corpus location
        run=lambda params, tracker, _: fetch(params, tracker, args.out, args.cache_dir),
        report=lambda meta: f"{meta['origin']} -> {args.out}: {meta['tokenizer']} tokenizer, vocab "
                            f"{meta['vocab_size']}, train {meta['num_tokens']['train']} tokens, val "
                            f"{meta['num_tokens']['val']} tokens",
    ), args.params)


def fetch(params: Params, tracker: Tracker, out: Path, cache_dir: Path) -> dict[str, Any]:
    """Prepare the text into `out`, log its sizes and files to the run, and point `run.json` at the run."""
    cfg = params.text_data
    meta = prepare_text(cfg.source, url=cfg.url, sha256=cfg.sha256, path=cfg.path, val_fraction=cfg.val_fraction,
                        tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, out_dir=out, cache_dir=cache_dir)
    tracker.log_metrics({"vocab_size": meta["vocab_size"],
                         **{f"{split}.num_tokens": n for split, n in meta["num_tokens"].items()},
                         **{f"{split}.num_chars": n for split, n in meta["num_chars"].items()}})
    tracker.set_tags({"input.source.sha256": meta["source_sha256"], "data.origin": meta["origin"]})
    tracker.log_artifact(out / "meta.json")
    tracker.log_artifact(out / "tokenizer.json")
    write_run_record(out / "run.json", tracker)
    return meta


if __name__ == "__main__":
    main()
