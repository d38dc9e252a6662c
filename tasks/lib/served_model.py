"""The MLflow pyfunc wrapper a registered alignflow model loads through: base model + LoRA adapter, or full weights.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(["prompt", ...])` returns one greedy answer per
prompt. The adapter and tokenizer travel inside the registered model; the base model is referenced by the
path (and recipe spec) in the model config, because copying a multi-GB base into every version would waste
the artifact store. A full fine-tune has no adapter: its complete weights travel as the `model` artifact.

The register stage logs this file itself as the model's code (MLflow's "models from code"): loading the model
runs this source, never unpickles a Python object. `set_model` below names the model that file defines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from alignflow.tasks.lib.models import load_tokenizer, load_tuned

        cfg = context.model_config
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        weights = Path(context.artifacts.get("adapter") or context.artifacts["model"])
        self.tok = load_tokenizer(weights)
        self.model = load_tuned(Path(cfg["base_path"]), cfg.get("dtype", "float32"), weights).eval()

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from alignflow.tasks.lib.inference import generate

        prompts = [[{"role": "user", "content": p}] for p in model_input]
        answers = generate(self.model, self.tok, prompts, max_new_tokens=self.max_new_tokens, batch_size=8)
        return [a[0] for a in answers]


mlflow.models.set_model(AdapterModel())
