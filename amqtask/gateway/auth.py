"""Bearer tokens for the gateway: from ``gateway_tokens`` and ``gateway_tokens_file``, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

from ..errors import ConfigurationError
from ..settings import Settings


def load_tokens(settings: Settings) -> tuple[bytes, ...]:
    """Every accepted token (none: the gateway is open; bind it to a trusted interface)."""
    tokens = list(settings.gateway_tokens)
    if settings.gateway_tokens_file:
        path = Path(settings.gateway_tokens_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"gateway_tokens_file {str(path)!r} cannot be read: {exc.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(token.encode() for token in tokens)


def authorized(header: str | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether an ``Authorization`` header carries one of ``tokens`` (all are compared: no early exit)."""
    if not tokens:
        return True
    scheme, _, offered = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not offered:
        return False
    given = offered.strip().encode()
    matches = [hmac.compare_digest(given, token) for token in tokens]
    return any(matches)


__all__ = ["authorized", "load_tokens"]
