"""The MLflow pyfunc wrapper a registered alignflow model loads through: base model + LoRA adapter.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(["prompt", ...])` returns one greedy answer per
prompt. The adapter and tokenizer travel inside the registered model; the base model is referenced by the
path (and recipe spec) in the model config, because copying a multi-GB base into every version would waste
the artifact store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from peft import PeftModel

        from tasks.modeling import load_causal_lm, load_tokenizer

        cfg = context.model_config
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        self.tok = load_tokenizer(Path(context.artifacts["adapter"]))
        base = load_causal_lm(Path(cfg["base_path"]), cfg.get("dtype", "float32"))
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from tasks.modeling import generate

        prompts = [[{"role": "user", "content": p}] for p in model_input]
        answers = generate(self.model, self.tok, prompts, max_new_tokens=self.max_new_tokens, batch_size=8)
        return [a[0] for a in answers]
