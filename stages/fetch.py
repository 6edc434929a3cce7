"""DVC stage `fetch`: download or read the data source and write the prepared splits.

Usage: python -m stages.fetch --params params.yaml --out data/prepared --cache-dir data/cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, stage_run, write_run_record
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.prepare import check_inputs, prepare_dataset
from pipeline_lib.vision.data.summary import log_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="prepared-data folder (the stage's out)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where downloads and extractions are kept")
    args = parser.parse_args()
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        check_inputs(params.data)  # ... and the data location, before any MLflow run
        logged = {"seed": params.seed, **flatten(params.data, prefix="data.")}
        with stage_run("fetch", params, logged) as run:
            metas = prepare_dataset(params.data, params.seed, args.out, args.cache_dir)
            log_prepared(run, args.out, metas)
            write_run_record(args.out / "run.json", run)
    except (ConfigError, DataError, TrackingUnavailable) as err:
        sys.exit(f"fetch: {err}")
    sizes = ", ".join(f"{name} {meta['num_images']}" for name, meta in metas.items())
    print(f"fetch: {params.data.source} -> {args.out} ({sizes}); MLflow run {run.run_id}")


if __name__ == "__main__":
    main()
