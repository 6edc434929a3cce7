"""DVC stage `fetch`: download or read the data source and write the prepared splits.

Usage: python -m stages.fetch --params params.yaml --out data/prepared --cache-dir data/cache
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.prepare import check_inputs, run_fetch


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="prepared-data folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads and extractions are kept")
    args = parser.parse_args()
    run_stage(Stage(
        "fetch", load_params, logged=lambda params: {"seed": params.seed, **flatten(params.data, prefix="data.")},
        check=lambda params: check_inputs(params.data),  # the data location
        run=lambda params, tracker, _: run_fetch(params, tracker, args.out, args.cache_dir),
        report=lambda done: f"{done['source']} -> {args.out} ({done['sizes']}); MLflow run {done['run_id']}",
    ), args.params)




if __name__ == "__main__":
    main()
