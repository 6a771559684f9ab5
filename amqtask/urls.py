"""Broker URLs as they may be shown: credentials never appear in logs, CLI output or errors."""

from __future__ import annotations

import re

# Greedy up to the last "@" before the path: that is where yarl (and so aio-pika) splits, so a raw
# "@" inside a password is still part of the password.
_CREDENTIALS = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*)(?::[^/?#]*)?@")


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh`` (a URL without credentials is unchanged)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def mask_text(text: str, urls: tuple[str, ...]) -> str:
    """Replace every occurrence of the given URLs, and of any password in them, in free text."""
    for url in urls:
        text = text.replace(url, mask_url(url))
        match = re.match(r"^[a-z][a-z0-9+.-]*://[^:@/]*:(?P<password>[^/?#]*)@", url)
        if match and match["password"]:
            text = text.replace(match["password"], "***")
    return text
