"""Broker URLs as they may be shown: credentials never appear in logs, CLI output or errors."""

from __future__ import annotations

import re
import urllib.parse

# The password runs from the first ":" after the user to the LAST "@" of the URL. That is where yarl
# (and so aio-pika) splits a raw "@" inside a password, and it also takes in the "/", "?" and "#" a
# password may hold unencoded ("amqp://u:pa/ss@host/vh"): masking too much of an odd URL is safe,
# showing part of a password is not.
_CREDENTIALS = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/?#]*)(?::(?P<password>.*))?@(?=[^@]*$)", re.DOTALL
)
# A piece of a password between the characters that end a URL part, long enough to mean something
# when a parser quotes a broken URL's fragment ("invalid port 'pa'") instead of the whole password.
_PIECE = re.compile(r"[^/?#@:]{4,}")
_URL_DELIMITERS = str.maketrans({c: f"%{ord(c):02X}" for c in "/?#@"})


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh`` (a URL without credentials is unchanged)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def encode_credentials(url: str) -> str:
    """``url`` with the "/", "?", "#" and "@" of its password percent-encoded, so a URL parser reads
    the password as one (unencoded, they would split it into host, path, query and fragment, and a
    client logging the misparsed URL would show the pieces)."""

    def encoded(m: re.Match[str]) -> str:
        if m["password"] is None:
            return m[0]
        return f"{m['scheme']}{m['user']}:{m['password'].translate(_URL_DELIMITERS)}@"

    return _CREDENTIALS.sub(encoded, url)


def _secrets(url: str) -> list[str]:
    """The forms in which ``url``'s password may be quoted by a parser or an error, longest first."""
    match = _CREDENTIALS.match(url)
    if not match or not match["password"]:
        return []
    password = match["password"]
    forms = {password, urllib.parse.unquote(password), urllib.parse.quote(password, safe="")}
    forms.update(_PIECE.findall(password))
    return sorted(forms, key=len, reverse=True)


def mask_text(text: str, urls: tuple[str, ...]) -> str:
    """Replace every occurrence of the given URLs, and of any password in them, in free text."""
    for url in urls:
        text = text.replace(url, mask_url(url))
        for secret in _secrets(url):
            text = text.replace(secret, "***")
    return text
