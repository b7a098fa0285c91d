"""The masker against real-shaped secrets (each must vanish) and ordinary values (each must
survive unchanged)."""

from __future__ import annotations

import pytest

from ipaas.masking import REDACTED, SecretMasker, mask_text, mask_value

SECRETS = [
    ("api_key=sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
    ("apiKey: AbCdEf123456", "AbCdEf123456"),
    ('{"api_key": "k-12345-abcde"}', "k-12345-abcde"),
    ('{"password": "hunter2!"}', "hunter2!"),
    ("password=correct-horse-battery", "correct-horse-battery"),
    ("client_secret=shhh-very-secret", "shhh-very-secret"),
    ("access_token=ya29.a0AfH6SMBx", "ya29.a0AfH6SMBx"),
    ("token: 0123456789abcdef", "0123456789abcdef"),
    ("X-Api-Key: zz9plural-alpha", "zz9plural-alpha"),
    ("Authorization: Bearer abcDEF123.ghiJKL456", "abcDEF123.ghiJKL456"),
    ("authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("Authorization: Bearer secretpassword", "secretpassword"),  # a header's credential, whatever its shape
    ("{'Authorization': 'Basic opensesame'}", "opensesame"),
    ("Proxy-Authorization: Basic qwertyuiop", "qwertyuiop"),
    ("retrying with token ghp0123456789abcdef", "ghp0123456789abcdef"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "eyJzdWIiOiIxMjM0NTY3ODkwIn0"),
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("posting to hooks.slack.com/workflows/T0/A0/123/abc", "T0/A0/123/abc"),
    ("https://discord.com/api/webhooks/123456789012345678/aBcD_eFgH-ijkl.mnop", "aBcD_eFgH-ijkl.mnop"),
    ("https://discordapp.com/api/webhooks/123456789012345678/tok_en-1", "tok_en-1"),
    ("https://canary.discord.com/api/v10/webhooks/42/secret_tok", "secret_tok"),
    ("slack xoxb-1234567890-0987654321-AbCdEfGhIjKl", "xoxb-1234567890-0987654321-AbCdEfGhIjKl"),
    ("xoxp-1111-2222-3333-abcdef", "xoxp-1111-2222-3333-abcdef"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    ("stripe sk_test_51H8abcdefghijklmnop", "sk_test_51H8abcdefghijklmnop"),
    ("rk_live_abcdefghijklmnopqrstu", "rk_live_abcdefghijklmnopqrstu"),
    ("gh ghp_" + "a1B2c3D4e5" * 3 + "abcdef", "ghp_" + "a1B2c3D4e5" * 3 + "abcdef"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("card 4111 1111 1111 1111 charged", "4111 1111 1111 1111"),
    ("card 5500-0000-0000-0004", "5500-0000-0000-0004"),
    ("card 378282246310005", "378282246310005"),
    ("contact alex.smith+orders@example.co.uk now", "alex.smith+orders@example.co.uk"),
    ("postgresql://admin:s3cr3tpw@db.internal:5432/app", "s3cr3tpw"),
    ("redis://:p4ssw0rd@cache:6379/0", "p4ssw0rd"),
    ("signing secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("key ipk_Zx8mQ2vLr9TnW4yB6cD1eF3gH5jK7lM0nP2qR4sT6uV", "Zx8mQ2vLr9TnW4yB6cD1eF3gH5jK7lM0nP2qR4sT6uV"),
]

ORDINARY = [
    "550e8400-e29b-41d4-a716-446655440000",
    "wf_01jd3k4m5n6p7q8r9s0t1v2w3x",
    "ex_01jd3k4m5n6p7q8r9s0t1v2w3x",
    "2026-11-23T03:22:03.123Z",
    "2026-11-23 03:22:03+00:00",
    "order 12345678901234 shipped",
    "version 1.2.3",
    "https://api.openweathermap.org/data/2.5/weather?q=Paris",
    "https://example.com/path/to/page",
    "the passage about the tokenizer",
    "status=succeeded attempts=3",
    "temperature 21.5 humidity 40",
    "port 5432 on host db",
    "phone 0612345678",
    "step_id=notify connector=slack",
    "duration_ms=1234",
    "Basic plan exceeded",
    "Bearer of good news",
]


@pytest.mark.parametrize("text,secret", SECRETS)
def test_secrets_are_masked(text: str, secret: str) -> None:
    masked = mask_text(text)
    assert secret not in masked
    assert REDACTED in masked


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_values_survive(text: str) -> None:
    assert mask_text(text) == text


def test_url_credentials_keep_scheme_and_host() -> None:
    assert mask_text("postgresql://admin:pw@db:5432/x") == f"postgresql://{REDACTED}@db:5432/x"


def test_nested_values_are_masked_by_key_and_by_pattern() -> None:
    value = {
        "config": {"webhook_url": "https://example.com/x", "text": "hi alex@example.com"},
        "items": [{"apiKey": "abc"}, "Bearer abcdefghijk123"],
        "count": 3,
    }
    masked = mask_value(value)
    assert masked["config"]["webhook_url"] == REDACTED
    assert "alex@example.com" not in masked["config"]["text"]
    assert masked["items"][0]["apiKey"] == REDACTED
    assert "abcdefghijk123" not in masked["items"][1]
    assert masked["count"] == 3
    assert value["config"]["webhook_url"] == "https://example.com/x", "the original is not changed"


def test_hostile_nesting_does_not_crash() -> None:
    deep: object = "Bearer abcdefghijk123"
    for _ in range(10_000):
        deep = [deep]
    assert "abcdefghijk123" not in repr(mask_value(deep))[:1000]


def test_known_secret_values_are_masked_even_without_a_pattern() -> None:
    masker = SecretMasker(known_secrets=["plainvalue42", "ab"])
    assert masker.text("sent with plainvalue42 inside") == f"sent with {REDACTED} inside"
    assert masker.text("ab stays: too short to mask safely") == "ab stays: too short to mask safely"
    assert masker.value({"note": ["x plainvalue42"]}) == {"note": [f"x {REDACTED}"]}


# Texts built from the pieces secrets and near-misses are made of, case variants and the
# Unicode letters re's IGNORECASE equates with ASCII ones (ı, ſ, K) included.
_PIECES = [
    "api_key", "apiKey", "X-Api-Key", "token", "TOKEN", "secret", "passWord", "paſſword", "pass", "PaSS", "paſſ", "bypass", "db_pass", "pwd", "appıd", "webhook_url",
    "Kelvin-\u212aey", "bearer ", "Basic ", "Authorization: ", "subscription", "Credentials.", "re-issued", "eyJhbGciOiJIUzI1NiJ9", ".eyJzdWIiOiIx", "hooks.slack.com/services/T0/B0/x",
    "discord.com/api/webhooks/1/ab", "xoxb-12345678", "AKIAIOSFODNN7EXAMPLE", "sk_live_abcdefghij12", "whsec_abcdefghij12",
    "ipk_abcdefghijklmnopqrstu", "ghp_" + "a" * 36, "https://", "user:pw@", "alex@example.com", "4111 1111 1111 1111",
    "4111111111111111", "1234", "=", ":", " ", '"', "'", ",", "/", "-", "_", "é", "ı", "ß", "12", "abc",
]


def test_hinted_scan_finds_exactly_what_the_full_scan_finds() -> None:
    from hypothesis import given, settings, strategies as st

    from ipaas.masking import _COMBINED, _replace

    @settings(max_examples=2000, deadline=None, database=None)
    @given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=12).map("".join))
    def same(text: str) -> None:
        assert mask_text(text) == _COMBINED.sub(_replace, text)

    same()


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("paſſword=hunter22", f"paſſword={REDACTED}"),
        ("appıd=abcdef", f"appıd={REDACTED}"),
        ("see https://bob:pw@example.com/x", f"see https://{REDACTED}@example.com/x"),
        ("card 4111 1111 1111 1111 ok", f"card {REDACTED} ok"),
    ],
)
def test_case_folded_and_nested_group_patterns(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_every_pattern_has_a_hint_in_pattern_order() -> None:
    from ipaas.masking import _BY_NAME, _active

    everything = "api_key=1 bearer eyJ hooks.slack.com discord xox AKIA _live_ whsec_ ipk_ gh https://a:b@c 4111 1111 1111 1111"
    assert _active(everything) == tuple(_BY_NAME)
    assert _active("execution.finished") == () and _active("ex_01jd3k4m5n6p7q8r9s0t1v2w3x") == ()


def test_secret_masker_builds_its_pattern_once_from_any_iterable() -> None:
    masker = SecretMasker(s for s in ["hunter2hunter2", None, "xyz"])  # a generator: read once
    assert masker.text("pw=hunter2hunter2") == f"pw={REDACTED}"
    assert masker.text("again hunter2hunter2") == f"again {REDACTED}"
    assert masker.value({"note": "hunter2hunter2 xyz"}) == {"note": f"{REDACTED} xyz"}


@pytest.mark.parametrize(
    "text",
    ["key-" * 25_000 + "=", "pass-" * 20_000 + "=", "@" + "a." * 50_000, "://@" + "a." * 50_000, "password" + " " * 100_000 + "=x"],
    ids=["kv-prefix", "pass-prefix", "email", "url-credentials", "spaces"],
)
def test_masking_takes_linear_time_on_hostile_text(text: str) -> None:
    """The engine masks every rendered config and error on its event loop: an unbounded
    repeat made these 100 KB strings take 13 s to minutes (quadratic), during which the
    engine served nothing. Linear, each takes milliseconds; the bound is generous."""
    import time

    started = time.perf_counter()
    mask_text(text)
    assert time.perf_counter() - started < 1.0


def test_a_quoted_secret_is_masked_up_to_its_closing_quote() -> None:
    assert mask_text('{"password": "correct horse battery staple", "x": 1}') == '{"password": "***REDACTED***", "x": 1}'
    assert mask_text("password='a b;c' rest") == "password='***REDACTED***' rest"
    assert mask_text("client_secret=abc,def") == "client_secret=***REDACTED***,def"  # unquoted: up to a delimiter


@pytest.mark.parametrize(
    "text",
    [
        "Basic subscription exceeded for this account",
        "Bearer credentials expired",
        "token expiration reached",
        "the token refreshed.",
        "Basic authentication required",
        "a Bearer Certificate holder",
        "token re-issued yesterday",
    ],
)
def test_prose_after_bearer_basic_or_token_is_not_masked(text: str) -> None:
    """An upstream's error ("Basic subscription exceeded") lost its words: any 8 letters
    after "Bearer", "Basic" or "token" were taken for a credential. A credential has a
    digit, a symbol or a capital inside; a word of prose has none."""
    assert mask_text(text) == text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("pass=hunter2", f"pass={REDACTED}"),
        ("login user=bob pass: s3cr3t-value", f"login user=bob pass: {REDACTED}"),
        ('{"pass": "correct horse"}', f'{{"pass": "{REDACTED}"}}'),
        ("PASS = Zz9top", f"PASS = {REDACTED}"),
        ("smtp_pass=letmein123 db-pass:opensesame", f"smtp_pass={REDACTED} db-pass:{REDACTED}"),
        ("--pass=hunter22", f"--pass={REDACTED}"),
    ],
)
def test_pass_as_a_key_in_text_is_masked_like_password(text: str, masked: str) -> None:
    """The `pass` dict key was masked but `pass=...` in a log line or an error was not: the
    text patterns knew password, passwd and pwd only."""
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    ["pass through the proxy", "all checks passed: 12 of 12", "passes: 3", "passenger: Alex", "bypass=1", "compass: north", "surpass=yes", "a passage: read it"],
)
def test_words_holding_pass_are_not_taken_for_the_key(text: str) -> None:
    assert mask_text(text) == text
