"""DVC stage `text_fetch`: read the text corpus, split it, fit the tokenizer on train, store the token ids.

Usage: python -m stages.text_fetch --params params.yaml --out data/text/prepared --cache-dir data/cache
       python -m stages.text_fetch ... --set text_data.source=stdlib   (a params key changed for this run only:
       how a study prepares a second corpus beside the default's)
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import check_inputs, run_text_fetch


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="prepared text folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads are kept")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key for this run (repeatable), e.g. text_data.source=stdlib")
    args = parser.parse_args()
    run_stage(Stage(
        "text_fetch", lambda path: load_params(path, args.set),
        logged=lambda params: flatten(params.text_data, prefix="text_data."),
        check=lambda params: check_inputs(params.text_data),  # the corpus location
        run=lambda params, tracker, _: run_text_fetch(params, tracker, args.out, args.cache_dir),
        report=lambda meta: f"{meta['origin']} -> {args.out}: {meta['tokenizer']} tokenizer, vocab "
                            f"{meta['vocab_size']}, train {meta['num_tokens']['train']} tokens, val "
                            f"{meta['num_tokens']['val']} tokens",
    ), args.params)


if __name__ == "__main__":
    main()
