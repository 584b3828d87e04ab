"""The MLflow pyfunc face of a scorer: (N, 12, T) float32 crops at the input contract -> probabilities.

How a scorer is stored in MLflow, and why (MLflow 3 offers three ways):
- `mlflow.pytorch.log_model` now defaults to pt2 (torch.export): the reloaded graph module keeps only
  `forward`, losing `input_spec`, `encoder`/`head` access and everything fine-tuning needs.
- `serialization_format="pickle"` (or a cloudpickled `PythonModel`) means loading runs arbitrary code
  from a pickle; a clinical site may set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and refuse it.
- Chosen: the scorer file itself (plain tensors and dicts, `torch.load(weights_only=True)`) is the
  model's only artifact, and the code is the installed `stence` package, reached through MLflow's
  "models from code" entry file (`ENTRY_CODE`, three lines that import `ScorerModel`). Nothing is
  pickled, so the model loads with pickle deserialisation disabled, and the weights can be read
  without MLflow at all (`stence.serving.registry.load_champion` does exactly that). We do not ship the
  package as `code_paths`: MLflow would prepend a frozen copy to `sys.path`, which shadows the installed
  package in a fresh process but not in one that already imported `stence` (two versions of the code
  depending on import order). The model's requirements pin the `stence` version instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

from stence.models.scorer import load_scorer

SCORER_ARTIFACT = "scorer"  # key of the scorer file in the model's artifacts
INPUT_NAME = "ecg"  # the one named input of the signature: (N, n_leads, n_samples) float32
PROBABILITY = "probability"
EMBEDDING_PREFIX = "emb_"
OUTPUTS = ("probability", "embedding", "all")  # values of params={"output": ...}

# The models-from-code entry file written next to the model (see the module docstring).
ENTRY_CODE = """\
# StenCE scorer, MLflow "models from code" entry: weights come from the scorer artifact, code from stence.
from mlflow.models import set_model

from stence.serving.pyfunc import ScorerModel

set_model(ScorerModel())
"""


def probability_columns(n_out: int) -> list[str]:
    """Output column names: `probability` for one task, `probability_<k>` for multi-label heads."""
    return [PROBABILITY] if n_out == 1 else [f"{PROBABILITY}_{k}" for k in range(n_out)]


def scorer_signature(spec: dict[str, Any], n_out: int) -> Any:
    """The MLflow signature of a scorer with input contract `spec` and `n_out` tasks, as `predict` behaves:
    input `ecg`, a float32 tensor (-1, n_leads, n_samples) in the lead order `spec["leads"]`; output the
    DataFrame columns of `probability_columns(n_out)` (double, one per task); parameter `output`."""
    shape = (-1, len(spec["leads"]), int(spec["n_samples"]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape, INPUT_NAME)]),
        outputs=Schema([ColSpec(DataType.double, c) for c in probability_columns(n_out)]),
        params=ParamSchema([ParamSpec("output", DataType.string, PROBABILITY)]),
    )


def as_batch(model_input: Any, spec: dict[str, Any]) -> np.ndarray:
    """Model input (array, nested list, DataFrame of records, or {"ecg": array} as MLflow hands a named
    input to `predict`) -> (N, n_leads, n_samples) float32.

    A single (n_leads, n_samples) crop becomes a batch of one; any other shape raises ValueError naming
    the input contract.
    """
    if isinstance(model_input, Mapping):
        if INPUT_NAME not in model_input and len(model_input) != 1:
            raise ValueError(f"expected the input {INPUT_NAME!r}, got the inputs {sorted(model_input)}")
        model_input = model_input.get(INPUT_NAME, next(iter(model_input.values()), None))
    if isinstance(model_input, pd.DataFrame):
        model_input = np.stack([np.asarray(v, dtype=np.float32) for v in model_input.iloc[:, 0]])
    x = np.asarray(model_input, dtype=np.float32)
    n_leads, n_samples = len(spec["leads"]), int(spec["n_samples"])
    if x.ndim == 2:
        x = x[None]  # (12, T) -> (1, 12, T)
    if x.ndim != 3 or x.shape[1:] != (n_leads, n_samples):
        raise ValueError(
            f"expected crops of shape (N, {n_leads}, {n_samples}): {n_leads} leads {spec['leads']} at "
            f"{spec['fs']:g} Hz, {n_samples} samples, normalised as in training; got {x.shape}"
        )
    return x


def score_batch(scorer: torch.nn.Module, x: np.ndarray, output: str = PROBABILITY,
                batch_size: int = 64) -> pd.DataFrame:
    """Run a Scorer on (N, 12, T) crops -> DataFrame of probabilities and/or embedding columns."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    probs, embs = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = scorer(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
            probs.append(out["probability"].float().numpy())  # (b, n_out)
            embs.append(out["embedding"].float().numpy())  # (b, D)
    n_out = scorer.head.n_out
    p = np.concatenate(probs) if probs else np.zeros((0, n_out), np.float32)
    e = np.concatenate(embs) if embs else np.zeros((0, scorer.encoder.embed_dim), np.float32)
    parts = []
    if output in (PROBABILITY, "all"):
        parts.append(pd.DataFrame(p.astype(np.float64), columns=probability_columns(n_out)))
    if output in ("embedding", "all"):
        parts.append(pd.DataFrame(e.astype(np.float64),
                                  columns=[f"{EMBEDDING_PREFIX}{k}" for k in range(e.shape[1])]))
    return pd.concat(parts, axis=1)


class ScorerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `load_context` rebuilds the Scorer from its weights-only file; `predict` takes
    (N, 12, T) float32 crops at the input contract and returns a DataFrame with `probability` (or the
    embedding columns `emb_<k>` with params={"output": "embedding"}, both with "all")."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.scorer = load_scorer(context.artifacts[SCORER_ARTIFACT])
        self.input_spec = self.scorer.input_spec

    # np.ndarray is a hint MLflow 3 accepts without deriving a schema from it: the logged signature rules.
    def predict(self, context: mlflow.pyfunc.PythonModelContext | None, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """(N, 12, T) float32 -> DataFrame (N, n_out) of probabilities, or (N, D) embedding columns."""
        output = (params or {}).get("output") or PROBABILITY
        return score_batch(self.scorer, as_batch(model_input, self.input_spec), output)
