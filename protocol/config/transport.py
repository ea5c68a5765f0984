"""ZeroMQ security and message limits shared by every process."""

from pydantic import Field

from protocol.codec import Limits
from protocol.config.base import Section


class SecurityConfig(Section):
    curve_public_key: str = Field("", description="This process's Z85 CURVE public key; '' = security off.")
    curve_secret_key: str = Field("", description="This process's Z85 CURVE secret key.")
    server_public_key: str = Field("", description="Public key of the server a client connects to.")
    authorized_keys: list[str] = Field([], description="Client public keys a server accepts (others are refused).")


class LimitsConfig(Section):
    max_message_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest message a process decodes.")
    max_nodes: int = Field(100_000, gt=0, description="Most segments in one tree message.")
    max_tokens: int = Field(16 * 1024 * 1024, gt=0, description="Most tokens in one tree message.")
    max_str_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Longest string field.")

    def limits(self) -> Limits:
        return Limits(**self.model_dump())
