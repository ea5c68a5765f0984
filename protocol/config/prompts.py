"""Where prompts come from."""

from typing import Any, Literal

from pydantic import Field, model_validator

from protocol.config.base import Section


class PromptsConfig(Section):
    source: Literal["reasoning_gym", "jsonl", "parquet"] = Field(
        "reasoning_gym", description="reasoning-gym generators, or a file of {prompt, answer} rows.")
    datasets: list[str] = Field(["basic_arithmetic"], description="reasoning-gym generator names.")
    dataset_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per generator name, keyword arguments of its reasoning-gym config (e.g. "
        "basic_arithmetic: {max_terms: 2, max_digits: 1}); a name not in `datasets` is an error.")
    path: str = Field("", description="JSONL/Parquet file (source=jsonl|parquet).")
    size: int = Field(1000, gt=0, description="Prompts generated per reasoning-gym dataset.")
    seed: int = Field(0, description="Seed of the generators and of the prompt order.")
    system_prompt: str = Field("Please reason step by step, and put your final answer within \\boxed{}.",
                               description="System message of the chat template ('' = none).")
    max_prompt_tokens: int = Field(512, gt=0, description="Prompts are left-truncated to this many tokens.")

    @model_validator(mode="after")
    def _args_name_datasets(self):
        unknown = sorted(set(self.dataset_args) - set(self.datasets))
        if unknown:
            raise ValueError(f"dataset_args names generators not in datasets: {unknown}")
        return self
