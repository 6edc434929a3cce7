"""The promotion gates from the command line: move each model's `champion` to its `challenger` only if it
scores better.

Usage: python -m pipeline_lib.promote [--params params.yaml] [--model task_ar ...]
           [-S promote.classifier.min_delta=0.01] [--summary FILE] [--report FILE] [--exit-code]

The `promote` section of params.yaml declares one gate per registered model (classifier, task_ar, ...: which
metric, its direction, the minimum improvement); `-S` overrides a key for this call, and `--model` picks gates
(default: every declared one). The tracking store is the pipeline's (`MLFLOW_TRACKING_URI`, else the project's
mlflow.db). Each decision and its numbers are printed, appended as markdown to `--summary` (a CI job summary)
and written as JSON to `--report`. A gate that cannot decide does not stop the others.

Exit status:
    0  decided: promoted, kept or unchanged (the challenger already is the champion), every gate
    1  a champion was kept, only with --exit-code (as `git diff --exit-code` reports a difference)
    2  bad input: an invalid params key, an undeclared --model, no challenger, or a version whose run lacks
       the metric
    3  the tracking store is unreachable or refuses requests
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.registry import Decision, PromotionError, promote
from pipeline_lib.core.tracking import TrackingUnavailable, check_tracking_store, redacted, tracking_uri
from pipeline_lib.params import Params, load_params

EXIT_DECIDED, EXIT_KEPT, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def declared_gates(params: Params, models: Sequence[str] = ()) -> dict[str, str]:
    """Gate key -> registered name, for `models` (default: every gate the promote section declares).

    Raises:
        ConfigError: a model has no declared gate.
    """
    gates = params.promote.gates()
    for model in models:
        if model not in gates:
            raise ConfigError(f"--model {model}: no gate promote.{model} is declared in the params; declared: "
                              f"{', '.join(gates) or 'none'}")
    names = params.tracking.registered_models()
    return {model: names[model] for model in (models or gates)}


def run_gate(params: Params, model: str) -> Decision:
    """Apply the gate `promote.<model>` to its registered model in the pipeline's tracking store.

    Raises:
        TrackingUnavailable: the tracking server is down or refuses requests.
        PromotionError: no challenger, or a compared version's run lacks the metric.
    """
    import mlflow

    uri = tracking_uri()
    check_tracking_store(uri)
    gate = params.promote.gates()[model]
    name = params.tracking.registered_models()[model]
    return promote(mlflow.MlflowClient(uri), name, metric=gate.metric, mode=gate.mode, min_delta=gate.min_delta)


def run_gates(params: Params, models: Sequence[str] = ()) -> tuple[list[Decision], list[str]]:
    """Every requested gate (see `declared_gates`): the decisions, and a line for each gate that could not
    decide. A `TrackingUnavailable` stops them all."""
    decisions, errors = [], []
    for model, name in declared_gates(params, models).items():
        try:
            decisions.append(run_gate(params, model))
        except PromotionError as err:
            errors.append(f"promote.{model} ({name}): {err}")
    return decisions, errors


def decision_markdown(decision: Decision) -> str:
    """The decision as a markdown section for a CI job summary or a pull-request comment."""
    rows = [f"| challenger | v{decision.challenger_version} | {_cell(decision.challenger_value)} |"]
    if decision.champion_version is not None and decision.action != "unchanged":
        rows.append(f"| champion before | v{decision.champion_version} | {_cell(decision.champion_value)} |")
    lines = [f"### Promotion gate: `{decision.model}`", "",
             f"| | version | `{decision.metric}` ({decision.mode}) |", "|---|---|---|", *rows, "",
             f"**{decision.action}**: {decision.summary()}"]
    if decision.same_data is False:
        lines.append("\nNote: the two versions were scored on different prepared data (`input.data.sha256`).")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def append_text(path: Path | None, text: str) -> None:
    """Append `text` to `path` (a CI job summary collects several steps), if a path is given."""
    if path is not None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.promote", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 decided, 1 kept (with --exit-code), 2 bad input, "
                                            "3 tracking store unreachable")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", action="append", default=[], metavar="GATE",
                        help="a gate of the promote section (classifier, task_ar, ...); repeat for several; "
                             "default: every declared gate")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key for this call, as `dvc exp run -S` does")
    parser.add_argument("--summary", type=Path, help="append the decisions as markdown (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--report", type=Path, help="write the decisions as JSON")
    parser.add_argument("--exit-code", action="store_true", help="exit 1 when a champion is kept")
    args = parser.parse_args(argv)
    try:
        decisions, errors = run_gates(load_params(args.params, args.overrides), args.model)
    except ConfigError as err:
        print(f"promote: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrackingUnavailable as err:
        print(f"promote: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    for decision in decisions:
        print(f"promote: {decision.summary()} [{redacted(tracking_uri())}]")
        append_text(args.summary, decision_markdown(decision))
    for error in errors:
        print(f"promote: {error}", file=sys.stderr)
        append_text(args.summary, f"### Promotion gate\n\n**not decided**: {error}\n")
    if args.report is not None:
        args.report.write_text(json.dumps({"decisions": [d.as_dict() for d in decisions], "errors": errors},
                                          indent=2) + "\n")
    if errors:
        return EXIT_BAD_INPUT
    return EXIT_KEPT if args.exit_code and any(d.action == "kept" for d in decisions) else EXIT_DECIDED


if __name__ == "__main__":
    sys.exit(main())
