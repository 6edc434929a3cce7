"""DVC stage `fetch`: download or read the data source and write the prepared splits.

Usage: python -m stages.fetch --params params.yaml --out data/prepared --cache-dir data/cache
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.core.tracking import Tracker, write_run_record
from pipeline_lib.params import Params, load_params
from pipeline_lib.vision.data.prepare import check_inputs, prepare_dataset
from pipeline_lib.vision.data.summary import log_prepared


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="prepared-data folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads and extractions are kept")
    args = parser.parse_args()
    run_stage(Stage(
        "fetch", load_params, logged=lambda params: {"seed": params.seed, **flatten(params.data, prefix="data.")},
        check=lambda params: check_inputs(params.data),  # the data location
        run=lambda params, tracker, _: fetch(params, tracker, args.out, args.cache_dir),
        report=lambda done: f"{done['source']} -> {args.out} ({done['sizes']}); MLflow run {done['run_id']}",
    ), args.params)


def fetch(params: Params, tracker: Tracker, out: Path, cache_dir: Path) -> dict[str, Any]:
    """Prepare the splits into `out`, log them to the run, and point `run.json` at the run."""
    metas = prepare_dataset(params.data, params.seed, out, cache_dir)
    log_prepared(tracker, out, metas)
    write_run_record(out / "run.json", tracker)
    sizes = ", ".join(f"{name} {meta['num_images']}" for name, meta in metas.items())
    return {"source": params.data.source, "sizes": sizes, "run_id": tracker.run_id}


if __name__ == "__main__":
    main()
