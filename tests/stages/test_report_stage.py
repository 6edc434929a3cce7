"""`python -m pipeline_lib.report` on the reproduced toy project: every headline number is there (the stages
write each key the report reads), the pixel baselines among them, as text and as Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline_lib.report import HEADLINE, MISSING


def has(document: dict[str, Any], key: str) -> bool:
    """Whether dotted `key` is in `document` (its value may be null: RL's selective risk at zero coverage)."""
    head, _, rest = key.partition(".")
    return head in document and (not rest or (isinstance(document[head], dict) and has(document[head], rest)))


def test_the_stages_write_every_headline_key(toy_project: Path) -> None:
    """A renamed metric fails here, not as a silent "—" in the report (a study's table: tests/stages/test_<study>)."""
    for table in (table for table in HEADLINE if table.study is None):
        document = json.loads((toy_project / "metrics" / table.file).read_text())
        keys = [key for row in table.rows for key in row.keys if key is not None] + list(table.note_keys)
        assert [key for key in keys if not has(document, key)] == [], table.file


def test_report_of_the_reproduced_project(toy_project: Path, tmp_path: Path) -> None:
    markdown = tmp_path / "headline.md"  # outside the project, which this test only reads
    done = subprocess.run([sys.executable, "-m", "pipeline_lib.report", "--markdown", str(markdown)],
                          cwd=toy_project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text, written = done.stdout, markdown.read_text()
    summary = json.loads((toy_project / "metrics" / "evaluate.json").read_text())
    studies = [f"not found (run dvc repro studies/dvc.yaml:{table.study})" for table in HEADLINE if table.study]
    assert "unreadable" not in text and text.count("not found") == len(studies)
    assert all(line in text for line in studies)  # the default repro runs no study: the report says how to
    vision = text[:text.index(HEADLINE[1].title)]
    assert MISSING not in vision, vision
    baselines = summary["baselines"]
    for label, name in (("pixels: logistic regression", "pixels_logreg"),
                        ("pixels: RBF SVM, C and gamma by CV on labeled", "pixels_svm"),
                        ("pixels: LabelSpreading with the unlabeled pool, by CV on labeled", "pixels_label_spreading")):
        assert f"{label}  " in vision and f"{baselines[name]['top1']:.4f}\n" in vision
        assert f"| {label} | {baselines[name]['top1']:.4f} |" in written
    svm, spreading = baselines["pixels_svm"], baselines["pixels_label_spreading"]
    assert (f"the pixel SVM's C {svm['C']:g}, gamma {svm['gamma']:g}; LabelSpreading's kernel {spreading['kernel']}, "
            f"alpha {spreading['alpha']:g}.") in vision
    assert f"| SSL gain over the pixel SVM | {summary['gain']['ssl_vs_pixels_svm']:+.4f} |" in written
    gain = summary["gain"]["ssl_vs_pixels_label_spreading"]
    assert f"| SSL gain over pixel LabelSpreading | {gain:+.4f} |" in written
    assert f"| semi-supervised gain over SSL | {summary['gain']['semi_vs_ssl']:+.4f} |" in written
    for table in HEADLINE:
        assert f"{table.title}\n" in text and f"\n### {table.title}\n" in written
