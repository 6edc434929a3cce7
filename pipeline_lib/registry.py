"""Model versions in the MLflow registry: log a pyfunc model, register it, tag its lineage, set aliases.

Aliases, not the deprecated stages: `challenger` marks the newest candidate; `champion` is moved only by the
promotion gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import pipeline_lib

CHALLENGER = "challenger"
REQUIREMENTS = ["torch", "torchvision", "timm", "numpy", "safetensors", "mlflow"]


def register_model(
    python_model: Any,
    model_dir: Path,
    *,
    name: str,
    artifact_name: str,
    input_example: np.ndarray,
    tags: Mapping[str, str],
    alias: str | None = CHALLENGER,
) -> int:
    """Log `model_dir` as a pyfunc model in the active run, register it under `name`, tag it; return the version.

    The library itself is packed with the model (`code_paths`), so the version loads without this checkout.
    """
    import mlflow
    from mlflow.models import infer_signature

    python_model.load_context(_Context(model_dir))
    output = python_model.predict(None, input_example)
    info = mlflow.pyfunc.log_model(
        name=artifact_name,
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(Path(pipeline_lib.__file__).parent)],
        signature=infer_signature(input_example, output),
        input_example=input_example,
        pip_requirements=REQUIREMENTS,
        registered_model_name=name,
    )
    version = int(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version))
    return version


class _Context:
    """The slice of MLflow's PythonModelContext that our models read, for a check before logging."""

    def __init__(self, model_dir: Path) -> None:
        self.artifacts = {"model_dir": str(model_dir)}
