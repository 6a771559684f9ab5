"""Credentials never leave amqtask: broker URLs and free text are masked before they are shown."""

from __future__ import annotations

import json

import pytest
import yarl

from amqtask.remote.commands import broker_info
from amqtask.urls import encode_credentials, mask_text, mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("amqps://app:s3cr3t@rabbit.example:5671/prod", "amqps://app:***@rabbit.example:5671/prod"),
        ("amqp://app:s3cr3t@[::1]:5672/vh", "amqp://app:***@[::1]:5672/vh"),
        ("amqp://app:p%40ss%2Fw%3Ard@host/vh", "amqp://app:***@host/vh"),
        ("amqp://app:pa:ss!$&'()*+,;=@host/vh", "amqp://app:***@host/vh"),
        ("amqp://:onlypassword@host/", "amqp://:***@host/"),
        ("amqps://app:s3cr3t@host/vh?heartbeat=30", "amqps://app:***@host/vh?heartbeat=30"),
        ("amqp://u:pa/ss@host/vh", "amqp://u:***@host/vh"),
        ("amqp://u:pa?ss@host:5672/vh", "amqp://u:***@host:5672/vh"),
        ("amqp://u:pa#ss@host/vh?heartbeat=30", "amqp://u:***@host/vh?heartbeat=30"),
        ("amqp://u:a/b?c#d@e@host/vh", "amqp://u:***@host/vh"),
    ],
    ids=[
        "guest",
        "amqps",
        "ipv6",
        "percent-encoded",
        "sub-delims",
        "no-user",
        "query",
        "raw-slash",
        "raw-question",
        "raw-hash",
        "raw-all",
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", ["amqp://localhost:5672//", "amqps://rabbit.example/vh", "amqp://"])
def test_mask_url_leaves_a_url_without_credentials_alone(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_of_a_user_without_password_shows_no_password() -> None:
    assert "@host" in mask_url("amqp://app@host/vh")
    assert "app" in mask_url("amqp://app@host/vh")


def test_mask_url_with_a_raw_at_sign_in_the_password() -> None:
    # yarl (aio-pika's URL parser) splits at the LAST '@': the password here is "p@ss@word".
    masked = mask_url("amqp://app:p@ss@word@rabbit.example/vh")
    assert "ss" not in masked.split("@rabbit")[0] and "word" not in masked.split("@rabbit")[0]
    assert masked.endswith("@rabbit.example/vh")


@pytest.mark.parametrize("password", ["pa/ss", "p?ss", "p#ss", "p@ss", "a/b?c#d@e", "plain", "p%2Fss"])
def test_encode_credentials_makes_a_url_parser_read_the_whole_password(password: str) -> None:
    url = yarl.URL(encode_credentials(f"amqp://app:{password}@rabbit.example:5672/vh?heartbeat=3"))
    assert (url.user, url.host, url.port, url.path, url.query["heartbeat"]) == (
        "app",
        "rabbit.example",
        5672,
        "/vh",
        "3",
    )
    assert url.password == password.replace("%2F", "/")


def test_encode_credentials_leaves_urls_without_a_password_alone() -> None:
    for url in ("amqp://rabbit.example/vh?x=a@b", "amqp://app@host/", "amqps://host:5671//"):
        assert encode_credentials(url) == url


def test_mask_text_hides_the_pieces_of_a_password_a_parser_split() -> None:
    url = "amqp://app:Zq9x/Kw7p?Rt4m#Vb2n@host//"
    masked = mask_text("invalid port 'Zq9x' in amqp://app:***@zq9x:5672/Kw7p?Rt4m#Vb2n", (url,))
    assert not any(piece in masked for piece in ("Zq9x", "Kw7p", "Rt4m", "Vb2n")), masked


URLS = ("amqp://app:FirstSecret@node1:5672//", "amqps://app:Second%2BSecret@node2:5671//")


def test_mask_text_hides_every_url_and_password() -> None:
    tried = "(password FirstSecret rejected; tried Second%2BSecret too)"
    text = f"cannot connect to {URLS[0]} nor {URLS[1]} {tried}"
    masked = mask_text(text, URLS)
    assert "FirstSecret" not in masked and "Second%2BSecret" not in masked
    assert "amqp://app:***@node1:5672//" in masked and "amqps://app:***@node2:5671//" in masked


def test_mask_text_hides_a_comma_separated_url_list() -> None:
    masked = mask_text(f"AMQTASK_BROKER_URL={URLS[0]},{URLS[1]} is unreachable", URLS)
    assert "FirstSecret" not in masked and "Second%2BSecret" not in masked


def test_mask_text_leaves_text_without_credentials_alone() -> None:
    text = "connection refused by node1:5672"
    assert mask_text(text, URLS) == text
    assert mask_text(text, ("amqp://node1//",)) == text


def test_mask_text_with_a_raw_at_sign_in_the_password() -> None:
    url = "amqp://app:p@ssw0rd@rabbit.example/vh"
    masked = mask_text(f"ConnectionError to {url}: refused", (url,))
    assert "p@ssw0rd" not in masked and "ssw0rd" not in masked
    assert masked.startswith("ConnectionError to amqp://app:***@rabbit.example/vh")


def test_the_broker_section_of_inspect_stats_reads_and_hides_a_password_with_raw_delimiters() -> None:
    info = broker_info("amqp://app:Zq9x/Kw7p?Rt4m#Vb2n@rabbit.example:5673/vh", ["amqp://b:Zq9x/Kw7p@h2//"], 30, 5)
    assert (info["hostname"], info["port"], info["userid"], info["virtual_host"]) == (
        "rabbit.example",
        5673,
        "app",
        "vh",
    )
    shown = json.dumps(info)
    assert not any(piece in shown for piece in ("Zq9x", "Kw7p", "Rt4m", "Vb2n")), shown
