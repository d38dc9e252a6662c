"""The LoRA adapter spec: one recipe shape for sft.lora, reward.lora and the adapter dpo trains over a full
fine-tune. `peft(task_type)` turns it into PEFT's LoraConfig."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: int = Field(32, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear",
                                            description="'all-linear' or module names, e.g. [q_proj, v_proj]")
    use_dora: bool = False  # weight-decomposed LoRA
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)

    def peft(self, task_type: str) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, use_dora=self.use_dora, use_rslora=self.use_rslora,
                          task_type=task_type)
