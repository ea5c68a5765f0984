"""How leaves are scored."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class RewardConfig(Section):
    kind: Literal["math", "reasoning_gym", "callable"] = Field(
        "math", description="math: last \\boxed{} vs gold with math-verify; reasoning_gym: the dataset's scorer "
        "(correct = score 1.0); callable: `function` below.")
    fallback: Literal["last_line", "last_number"] = Field(
        "last_line", description="reasoning_gym: the answer graded when the completion has no \\boxed{}: its last "
        "line, or its last number (lm-eval's flexible extract; for numeric tasks and models that do not box).")
    function: str = Field("", description="'module:function' called as f(completion_text, answer, **details) -> float.")
    correct: float = Field(1.0, description="Reward of a correct answer.")
    incorrect: float = Field(-1.0, description="Reward of a wrong (or unparsable, or timed-out) answer.")
    overlong_buffer: int = Field(0, ge=0, description="DAPO overlong penalty window in tokens (0 = off).")
    overlong_factor: float = Field(1.0, ge=0, description="DAPO overlong penalty factor.")
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock bound of one verification.")
