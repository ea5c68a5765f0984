"""The one error type of the protocol: decoding untrusted bytes raises this and nothing else."""


class ProtocolError(ValueError):
    """A message that cannot be accepted: malformed, oversize, wrong type, or unknown version.

    `reason` is a short machine-readable tag ("malformed", "too_large", "version", "type",
    "limit", "dtype") used as the label of drop counters; the message says what was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
