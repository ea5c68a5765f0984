"""Where prompts come from."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class PromptsConfig(Section):
    source: Literal["reasoning_gym", "jsonl", "parquet"] = Field(
        "reasoning_gym", description="reasoning-gym generators, or a file of {prompt, answer} rows.")
    datasets: list[str] = Field(["basic_arithmetic"], description="reasoning-gym generator names.")
    path: str = Field("", description="JSONL/Parquet file (source=jsonl|parquet).")
    size: int = Field(1000, gt=0, description="Prompts generated per reasoning-gym dataset.")
    seed: int = Field(0, description="Seed of the generators and of the prompt order.")
    system_prompt: str = Field("Please reason step by step, and put your final answer within \\boxed{}.",
                               description="System message of the chat template ('' = none).")
    max_prompt_tokens: int = Field(512, gt=0, description="Prompts are left-truncated to this many tokens.")
