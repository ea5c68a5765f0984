"""Shared base of every config section: unknown keys are errors (a typo fails at start-up)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
