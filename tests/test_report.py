"""The headline report on metrics files written here: the numbers land in their rows, as text and as Markdown, and
a track not reproduced yet (a missing file or key, an unreadable file) shows as "—" without stopping the rest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline_lib.report import HEADLINE, MISSING, main

POLICY = {"reward_greedy": 0.81, "accuracy": 0.92, "coverage": 0.97, "selective_risk": 0.05, "nll": 0.31, "ece": 0.04}
METRICS: dict[str, dict[str, Any]] = {
    "evaluate.json": {
        "ssl": {"top1": 0.9512, "macro_f1": 0.95}, "scratch": {"top1": 0.8123}, "semi": {"top1": 0.9601},
        "gain": {"top1": 0.1389, "ssl_vs_pixels_logreg": 0.0601, "ssl_vs_pixels_svm": -0.0042,
                 "ssl_vs_pixels_label_spreading": -0.0188, "semi_vs_ssl": 0.0089, "semi_vs_pixels_svm": 0.0047},
        "baselines": {"pixels_logreg": {"top1": 0.8911}, "pixels_svm": {"top1": 0.9554, "C": 10.0, "gamma": 0.1},
                      "pixels_label_spreading": {"top1": 0.97, "kernel": "knn", "alpha": 0.2}},
        "encoder": {"knn_top1": 0.7743, "linear_probe_top1": 0.8105},
        "labels": {"labeled_images": 144, "label_fraction": 0.1, "test_images": 359},
    },
    "rl.json": {
        "reward": {"type": "abstain"}, "reference": POLICY,
        "post_trained": {**POLICY, "reward_greedy": 0.8217, "ece": 0.0383},
        "baselines": {"bayes_reference": {**POLICY, "coverage": 0.9248}, "expected_reward": POLICY,
                      "cross_entropy_bayes": {**POLICY, "nll": 0.2148}},
        "gain": {"reward_greedy": 0.0117, "reward_greedy_over_bayes": 0.0195,
                 "reward_greedy_over_cross_entropy": -0.0418},
        "test_images": 359,
    },
    "label_curve.json": {"test_images": 359, "points": {
        f"p{percent}": {"ssl": 0.9 - 0.01 * index, "semi": 0.91, "scratch": 0.8, "pixels_svm": 0.92,
                        "pixels_label_spreading": 0.95,
                        **{pair: {"mean": 0.1, "low": 0.05 if index < 4 else float("nan"),
                                  "high": 0.15 if index < 4 else float("nan")}
                           for pair in ("ssl_minus_scratch", "semi_minus_ssl", "semi_minus_scratch")}}
        for index, percent in enumerate((1, 2, 5, 10, 25, 50))}},
    "text/evaluate.json": {"ngram": {"bpc": 1.6771}, "ar": {"bpc": 1.8118}, "mdm": {"bpc_bound": 2.9429}},
    "text/task.json": {
        **{f"{model}_{objective}": {"accuracy": accuracy, "pass_at_1": accuracy / 2, "maj_at_16": accuracy,
                                    "pass_at_16": 2 * accuracy, "format_rate": 1.0}
           for objective, row in (("ar", (0.0938, 0.0820, 0.1094)), ("mdm", (0.0352, 0.0293, 0.0156)))
           for model, accuracy in zip(("scratch", "sft", "rl"), row, strict=True)},
        "test_prompts": 512,
    },
    "text/rl_claim.json": {
        objective: {"sft": {"accuracy": [0.31, 0.35, 0.4]}, "differences": {
            pair: {metric: {"mean": base + shift, "low": base + shift - 0.05, "high": base + shift + 0.05,
                            "minimum": base + shift - 0.02}
                   for metric, shift in (("accuracy", 0.0), ("pass_at_1", 0.01), ("maj_at_16", 0.02),
                                         ("pass_at_16", -0.03))}
            for pair, base in (("grpo_minus_shuffled", 0.15), ("grpo_minus_sft", 0.08), ("grpo_minus_rft", -0.01))}}
        for objective in ("ar", "mdm")},
}
# Each headline row as the report must print it: label, then its cells.
VISION = [["SSL: finetuned from the pretrained encoder", "0.9512"],
          ["semi-supervised: the SSL model trained on with the unlabeled images", "0.9601"],
          ["scratch: same model and labels, random init", "0.8123"],
          ["pixels: logistic regression", "0.8911"],
          ["pixels: RBF SVM, C and gamma by CV on labeled", "0.9554"],
          ["pixels: LabelSpreading with the unlabeled pool, by CV on labeled", "0.9700"],
          ["encoder: kNN", "0.7743"], ["encoder: linear probe", "0.8105"],
          ["SSL gain over scratch", "+0.1389"], ["semi-supervised gain over SSL", "+0.0089"],
          ["semi-supervised gain over the pixel SVM", "+0.0047"], ["SSL gain over the pixel SVM", "-0.0042"],
          ["SSL gain over pixel LabelSpreading", "-0.0188"]]
CURVE = [[f"{percent}%", f"{0.9 - 0.01 * index:.4f}", "0.9100", "0.8000", "0.9200", "0.9500",
          *(["0.100 [0.050, 0.150]"] * 3 if index < 4 else ["0.100"] * 3)]
         for index, percent in enumerate((1, 2, 5, 10, 25, 50))]
RL = [["finetuned classifier (the reference)", "0.8100", "0.9200", "0.9700", "0.0500", "0.3100", "0.0400"],
      ["GRPO post-trained", "0.8217", "0.9200", "0.9700", "0.0500", "0.3100", "0.0383"],
      ["Bayes rule on the reference", "0.8100", "0.9200", "0.9248", "0.0500", "0.3100", "0.0400"],
      ["exact expected reward, same budget", "0.8100", "0.9200", "0.9700", "0.0500", "0.3100", "0.0400"],
      ["cross-entropy on rl + Bayes rule", "0.8100", "0.9200", "0.9700", "0.0500", "0.2148", "0.0400"]]
BPC = [["n-gram baseline", "1.6771"], ["autoregressive (ar)", "1.8118"],
       ["masked diffusion (mdm), an upper bound", "2.9429"]]
TASK = [[f"{objective}: {label}", f"{a:.4f}", f"{a / 2:.4f}", f"{a:.4f}", f"{2 * a:.4f}", "1.0000"]
        for objective, row in (("ar", (0.0938, 0.0820, 0.1094)), ("mdm", (0.0352, 0.0293, 0.0156)))
        for label, a in zip(("scratch + SFT", "pretrained + SFT", "+ GRPO"), row, strict=True)]
CLAIM = [[f"{objective}: {label}", *(f"{base + shift:+.3f} [{base + shift - 0.05:+.3f}, {base + shift + 0.05:+.3f}]"
                                     for shift in (0.0, 0.01, 0.02, -0.03)), f"{base - 0.02:+.4f}"]
         for objective in ("ar", "mdm")
         for label, base in (("GRPO - shuffled reward", 0.15), ("GRPO - SFT", 0.08), ("GRPO - RFT", -0.01))]
NOTES = ["144 labeled images (label fraction 0.1), 359 test images; the pixel SVM's C 10, gamma 0.1; LabelSpreading's "
         "kernel knn, alpha 0.2.",
         "Reward abstain, on 359 test images. GRPO's gain in greedy reward: +0.0117 over the reference, +0.0195 over "
         "the Bayes rule, -0.0418 over cross-entropy.",
         "On 512 test prompts: exact match of the greedy completion, and of 16 samples at temperature 1 the mean "
         "(pass@1), the majority vote and whether any is right; format: greedy completions well formed.",
         "From `dvc repro studies/dvc.yaml:text_rl_claim`: for each seed an SFT model, then GRPO and its controls "
         "from it at the same prompts, group size and steps (shuffled: GRPO on rewards permuted across each batch; "
         "RFT: SFT on the accepted samples). SFT greedy exact match over the seeds: ar 0.310 to 0.400, mdm 0.310 "
         "to 0.400."]


def write_metrics(folder: Path, metrics: dict[str, dict[str, Any]]) -> Path:
    for name, document in metrics.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(document))
    return folder


def report(folder: Path, capsys: pytest.CaptureFixture[str],
           markdown: Path) -> tuple[list[list[str]], list[list[str]], str]:
    """Run the command; the text output's table rows (cells split on 2+ spaces), the Markdown's table rows, and
    the text output itself."""
    assert main(["--metrics", str(folder), "--markdown", str(markdown)]) == 0
    text = capsys.readouterr().out
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()
            if re.search(r"\S\s{2,}\S", line) and not re.fullmatch(r"[-\s]+", line)]
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    return rows, table, text


def headers() -> list[list[str]]:
    return [list(table.columns) for table in HEADLINE]


def test_both_tracks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, table, text = report(write_metrics(tmp_path / "metrics", METRICS), capsys, tmp_path / "headline.md")
    expected = [headers()[0], *VISION, headers()[1], *CURVE, headers()[2], *RL, headers()[3], *BPC, headers()[4],
                *TASK, headers()[5], *CLAIM]
    assert rows == expected
    assert table == expected
    markdown = (tmp_path / "headline.md").read_text()
    for title in (t.title for t in HEADLINE):
        assert f"{title}\n" in text and f"### {title}\n" in markdown
    for note in NOTES:
        assert f"\n{note}\n" in text and f"\n{note}\n" in markdown
    assert markdown.startswith("## Headline\n") and "| --- | ---: |" in markdown and MISSING not in markdown


def test_a_track_not_reproduced_shows_dashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No text metrics, an rl.json that is not JSON, and an evaluate.json from before the pixel baselines."""
    metrics = {name: document for name, document in METRICS.items()
               if not name.startswith("text/") and name != "label_curve.json"}
    old = json.loads(json.dumps(metrics["evaluate.json"]))
    del old["baselines"]
    for key in ("ssl_vs_pixels_svm", "ssl_vs_pixels_label_spreading", "semi_vs_pixels_svm"):
        del old["gain"][key]
    folder = write_metrics(tmp_path / "metrics", {**metrics, "evaluate.json": old})
    (folder / "rl.json").write_text("{not json")
    rows, table, text = report(folder, capsys, tmp_path / "headline.md")
    vision = [[label, MISSING if "pixel" in label else value] for label, value in VISION]
    dashes = [[row[0]] + [MISSING] * (len(row) - 1) for row in CURVE + RL + BPC + TASK + CLAIM]
    expected = [headers()[0], *vision, headers()[1], *dashes[:6], headers()[2], *dashes[6:11], headers()[3],
                *dashes[11:14], headers()[4], *dashes[14:20], headers()[5], *dashes[20:]]
    assert rows == expected and table == expected
    assert "the pixel SVM's C —, gamma —; LabelSpreading's kernel —, alpha —." in text
    assert f"{folder / 'rl.json'} unreadable: " in text
    assert f"{folder / 'text' / 'evaluate.json'} not found (not reproduced yet)" in text
    assert f"{folder / 'text' / 'task.json'} not found (not reproduced yet)" in text


def test_no_metrics_folder_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metrics", str(tmp_path / "nowhere"), "--markdown", str(tmp_path / "headline.md")]) == 2
    assert f"--metrics {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "headline.md").exists()


def test_the_command_stays_light(tmp_path: Path) -> None:
    """`python -m pipeline_lib.report` prints the headline without importing torch, numpy or MLflow."""
    folder = write_metrics(tmp_path / "metrics", METRICS)
    code = ("import sys; from pipeline_lib.report import main; main(['--metrics', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'numpy', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("[]\n") and "0.9554" in done.stdout


def test_the_retrain_workflow_puts_the_headline_in_its_summary() -> None:
    """After the retrain step: the report as Markdown, appended to the job summary and to the PR comment's text."""
    workflow = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github/workflows/retrain.yml").read_text())
    scripts = [step.get("run", "") for step in workflow["jobs"]["train"]["steps"]]
    retrain = next(i for i, script in enumerate(scripts) if "pipeline_lib.retrain" in script)
    (headline,) = [i for i, script in enumerate(scripts) if "pipeline_lib.report" in script]
    assert headline > retrain
    lines = scripts[headline].splitlines()
    assert lines[0] == "python -m pipeline_lib.report --markdown headline.md"
    assert {'cat headline.md >> "$GITHUB_STEP_SUMMARY"', "cat headline.md >> retrain-report.md"} <= set(lines)


def test_an_interval_prints_as_mean_and_bounds_and_one_draw_as_its_mean_alone() -> None:
    from pipeline_lib.report import cell

    assert cell({"mean": 0.0412, "low": -0.059, "high": 0.1404}, signed=True) == "+0.041 [-0.059, +0.140]"
    assert cell({"mean": 0.0084, "low": float("nan"), "high": float("nan")}, signed=True) == "+0.008"
    assert cell({"mean": None, "low": 0.0, "high": 1.0}) == MISSING
