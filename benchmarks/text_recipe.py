"""Bits per character against training time for a text-track recipe: the stages' code, one run per line.

Prepares the corpus of `text_data` (in a temporary folder, so `data/text/prepared` is untouched), fits the
Kneser-Ney n-gram of `text_ngram` on it, then trains each requested objective with exactly the text_pretrain
stage's code and scores it with the text_evaluate stage's code. Prints one line per model: training seconds,
steps, tokens/s, validation bits per character (the masked model's is its bound) and the ratio to the n-gram.
Nothing is tracked. Run one at a time on a quiet machine; the seconds are wall time.

Examples:
    python benchmarks/text_recipe.py                                       # the committed recipe
    python benchmarks/text_recipe.py --objective ar -S text_model.d_model=128 -S text_model.n_head=4 \\
        -S text_model.n_layer=4 -S text_model.dropout=0.1 -S text_pretrain.epochs=16   # bigger, longer
    python benchmarks/text_recipe.py -S text_data.tokenizer=char -S text_model.seq_len=128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import prepare_configured, read_text_meta, read_tokens
from pipeline_lib.text.evaluate import BPC_KEY, score
from pipeline_lib.text.models.objectives import OBJECTIVES
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.ngram import NGramLM, bits_per_character
from pipeline_lib.text.pretrain import LMPaths, run_text_pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--objective", choices=OBJECTIVES, action="append", help="default: both")
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = params.text_data
        prepare_configured(cfg, out_dir=root / "data", cache_dir=Path("data/cache"))
        meta = read_text_meta(root / "data")
        ngram = NGramLM(params.text_ngram.order, meta["vocab_size"], params.text_ngram.method,
                        k=params.text_ngram.k, discount=params.text_ngram.discount)
        ngram.fit(read_tokens(root / "data", "train"))
        ngram_bpc = bits_per_character(-ngram.log_prob_sequence(read_tokens(root / "data", "val")),
                                       meta["num_chars"]["val"])
        print(f"{cfg.tokenizer} tokenizer, {meta['vocab_size']} ids, {meta['num_tokens']['train']} training tokens; "
              f"{params.text_ngram.order}-gram {params.text_ngram.method}: {ngram_bpc:.4f} bits per character")
        for objective in args.objective or OBJECTIVES:
            paths = LMPaths(root / "data", root / objective, root / f"{objective}.json", root / f"{objective}_plots",
                            root / f"{objective}_checkpoints")
            started = time.perf_counter()
            summary = run_text_pretrain(params, paths, objective, Tracker(), torch.device("cpu"))
            seconds = time.perf_counter() - started
            model, _, _ = load_lm(paths.out)
            bpc = score(model, objective, root / "data", params)[BPC_KEY[objective]]
            print(f"{objective}: {seconds:.1f} s, {summary['steps']} steps, {summary['tokens_per_second']:.0f} "
                  f"tokens/s, {summary['non_embedding_params']} non-embedding params: {BPC_KEY[objective]} "
                  f"{bpc:.4f} = {bpc / ngram_bpc:.3f} x the n-gram's", flush=True)


if __name__ == "__main__":
    main()
