"""Settings from IPAAS_* variables: every bad value stops start-up with one line naming the
setting; unset or empty is the default."""

from __future__ import annotations

import pytest

from ipaas.gateway.ratelimit import RateLimiter, parse_tiers
from ipaas.service.server import EngineSettings, connection_age_options
from ipaas.settings import Settings, boolean, choice, core_target, listen_address, seconds, whole_number


@pytest.mark.parametrize(("raw", "expected"), [("8", 8), (" 8 ", 8), ("0", 0), ("1e3", 1000), ("", 7), (None, 7)])
def test_a_whole_number_is_read_and_empty_is_the_default(raw: str | None, expected: int) -> None:
    env = {} if raw is None else {"IPAAS_X": raw}
    assert whole_number(env, "IPAAS_X", 7, maximum=1000) == expected


@pytest.mark.parametrize("raw", ["-1", "1001", "2.5", "nan", "inf", "-inf", "1e400", "ten", "1e3x"])
def test_a_whole_number_out_of_range_is_refused_in_one_line(raw: str) -> None:
    with pytest.raises(SystemExit, match=rf"^IPAAS_X must be a whole number from 0 to 1000, got '{raw}'$"):
        whole_number({"IPAAS_X": raw}, "IPAAS_X", 7, maximum=1000)


@pytest.mark.parametrize("raw", ["0", "-60", "nan", "inf", "1e12"])
def test_a_duration_must_be_positive_and_finite(raw: str) -> None:
    with pytest.raises(SystemExit, match=r"^IPAAS_X must be more than 0 seconds and at most 31536000, got"):
        seconds({"IPAAS_X": raw}, "IPAAS_X", 1.0)


def test_an_empty_duration_is_the_default() -> None:
    assert seconds({"IPAAS_X": " "}, "IPAAS_X", 1.5) == 1.5
    assert seconds({"IPAAS_X": "0.05"}, "IPAAS_X", 1.5) == 0.05


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("On", True), ("yes", True), ("0", False), ("off", False), ("FALSE", False), ("", None), (" ", None)])
def test_a_boolean_takes_the_usual_words(raw: str, expected: bool | None) -> None:
    assert boolean({"IPAAS_X": raw}, "IPAAS_X", None) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["ture", "2", "enabled", "y"])
def test_a_boolean_refuses_anything_else(raw: str) -> None:
    with pytest.raises(SystemExit, match=rf"^IPAAS_X must be 1 or 0 \(or true/false, yes/no, on/off\), got '{raw}'$"):
        boolean({"IPAAS_X": raw}, "IPAAS_X", False)


def test_a_choice_is_one_of_its_words() -> None:
    assert choice({"IPAAS_X": " Skip "}, "IPAAS_X", ("collapse", "skip"), "collapse") == "skip"
    assert choice({"IPAAS_X": ""}, "IPAAS_X", ("collapse", "skip"), "collapse") == "collapse"
    with pytest.raises(SystemExit, match=r"^IPAAS_X must be collapse or skip, got 'colapse'$"):
        choice({"IPAAS_X": "colapse"}, "IPAAS_X", ("collapse", "skip"), "collapse")


@pytest.mark.parametrize("raw", ["127.0.0.1:8080", "0.0.0.0:1", "localhost:65535", "[::1]:8080", ":8080"])
def test_a_listen_address_is_host_and_port(raw: str) -> None:
    assert listen_address({"IPAAS_X": raw}, "IPAAS_X", "d") == raw


@pytest.mark.parametrize("raw", ["127.0.0.1", "127.0.0.1:notaport", "127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:0", "127.0.0.1:-1", "::1:8080", "nonsense"])
def test_a_listen_address_without_a_usable_port_is_refused(raw: str) -> None:
    with pytest.raises(SystemExit, match=r"^IPAAS_X must be host:port with a port from 1 to 65535"):
        listen_address({"IPAAS_X": raw}, "IPAAS_X", "d")


@pytest.mark.parametrize("raw", ["127.0.0.1:50051", "core.internal:50051", "[::1]:50051", "dns:///core:50051", "ipv4:127.0.0.1:1,127.0.0.1:2", "unix:/run/ipaas.sock"])
def test_a_core_target_is_a_grpc_target(raw: str) -> None:
    assert core_target({"IPAAS_CORE_TARGET": raw}, "d") == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("core", "must be host:port"),  # gRPC would dial port 443
        ("core:99999", "must be host:port"),
        ("http://core:50051", "not a URL"),  # gRPC would resolve "http" as a host name
        ("grpc://core:50051", "not a URL"),
    ],
)
def test_a_core_target_grpc_would_misread_is_refused(raw: str, expected: str) -> None:
    with pytest.raises(SystemExit, match=rf"^IPAAS_CORE_TARGET .*{expected}.*got '{raw}'$"):
        core_target({"IPAAS_CORE_TARGET": raw}, "d")


def test_the_core_target_defaults_to_the_grpc_listen_address() -> None:
    assert Settings.from_env({"IPAAS_GRPC_LISTEN": "127.0.0.1:6000"}).core_target == "127.0.0.1:6000"


def test_the_grpc_listen_address_may_ask_for_any_free_port() -> None:
    """Tests start cores on 127.0.0.1:0; the core logs the port it got."""
    assert Settings.from_env({"IPAAS_GRPC_LISTEN": "127.0.0.1:0"}).grpc_listen == "127.0.0.1:0"
    with pytest.raises(SystemExit, match="IPAAS_HTTP_LISTEN"):
        Settings.from_env({"IPAAS_HTTP_LISTEN": "127.0.0.1:0"})


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("IPAAS_WORKERS", "-1", "IPAAS_WORKERS must be a whole number from 0 to 10000"),
        ("IPAAS_WORKERS", "abc", "IPAAS_WORKERS must be a whole number"),
        ("IPAAS_LOG_LEVEL", "VERBOSE", "IPAAS_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'VERBOSE'"),
        ("IPAAS_LOG_LEVEL", "notset", "IPAAS_LOG_LEVEL must be"),
        ("IPAAS_GRPC_LISTEN", "127.0.0.1:99999", "IPAAS_GRPC_LISTEN must be host:port with a port from 0 to 65535"),
        ("IPAAS_HTTP_LISTEN", "127.0.0.1:notaport", "IPAAS_HTTP_LISTEN must be host:port"),
        ("IPAAS_ALLOW_INSECURE_TARGETS", "ture", "IPAAS_ALLOW_INSECURE_TARGETS must be 1 or 0"),
        ("IPAAS_REDIS_URL", "localhost:6379", "IPAAS_REDIS_URL must be a redis://, rediss:// or unix:// URL"),
        ("IPAAS_ADMIN_KEY", "a", "IPAAS_ADMIN_KEY must be at least 32 printable ASCII characters"),
        ("IPAAS_ADMIN_KEY", "x" * 31, "IPAAS_ADMIN_KEY must be at least 32"),
        ("IPAAS_ADMIN_KEY", "x" * 31 + " ", "IPAAS_ADMIN_KEY must be at least 32"),
    ],
)
def test_bad_platform_settings_are_refused_in_one_line(setting: str, value: str, expected: str) -> None:
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({setting: value})
    message = str(refused.value.code)
    assert expected in message and "\n" not in message, message


def test_a_refused_admin_key_is_not_repeated_and_a_long_one_is_taken() -> None:
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({"IPAAS_ADMIN_KEY": "hunter2"})
    assert "hunter2" not in str(refused.value.code)
    assert Settings.from_env({"IPAAS_ADMIN_KEY": "k" * 32}).admin_key == "k" * 32


def test_a_refused_redis_url_is_not_repeated_it_may_hold_a_password() -> None:
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({"IPAAS_REDIS_URL": "redis:/:hunter2@cache:6379"})
    assert "hunter2" not in str(refused.value.code)


def test_platform_settings_read_as_documented() -> None:
    settings = Settings.from_env(
        {"IPAAS_LOG_LEVEL": "warn", "IPAAS_WORKERS": "", "IPAAS_ALLOW_INSECURE_TARGETS": "yes", "IPAAS_REDIS_URL": "rediss://cache:6380/0", "IPAAS_HTTP_LISTEN": "[::1]:8080"}
    )
    assert (settings.log_level, settings.workers, settings.allow_insecure_targets, settings.redis_url, settings.http_listen) == ("WARN", 0, True, "rediss://cache:6380/0", "[::1]:8080")
    assert Settings.from_env({"IPAAS_LOG_LEVEL": " "}).log_level == "INFO"


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("", None), ("  ", None), (" , ", None), ("slack, discord ", frozenset({"slack", "discord"}))])
def test_an_empty_plugin_allow_list_is_the_default_every_installed_connector(raw: str | None, expected: frozenset[str] | None) -> None:
    """IPAAS_PLUGINS= (a unit file passing an unset variable through) allowed no connector,
    so every step failed with nothing logged."""
    assert Settings.from_env({} if raw is None else {"IPAAS_PLUGINS": raw}).plugins == expected


ENGINE_REFUSED = [
    ("IPAAS_MAX_QUEUE_DEPTH", "-1", "IPAAS_MAX_QUEUE_DEPTH must be a whole number of 0 or more"),
    ("IPAAS_MAX_QUEUE_DEPTH", "nan", "IPAAS_MAX_QUEUE_DEPTH must be a whole number"),
    ("IPAAS_MAX_QUEUE_DEPTH", "1e3x", "IPAAS_MAX_QUEUE_DEPTH must be a whole number"),
    ("IPAAS_MAX_TENANT_QUEUE_DEPTH", "-1", "IPAAS_MAX_TENANT_QUEUE_DEPTH must be a whole number of 0 or more"),
    ("IPAAS_MAX_TENANT_QUEUE_DEPTH", "half", "IPAAS_MAX_TENANT_QUEUE_DEPTH must be a whole number"),
    ("IPAAS_STEP_TIMEOUT", "-5", "IPAAS_STEP_TIMEOUT must be more than 0 seconds"),
    ("IPAAS_STEP_TIMEOUT", "nan", "IPAAS_STEP_TIMEOUT must be more than 0 seconds"),
    ("IPAAS_EXECUTION_DEADLINE", "0", "IPAAS_EXECUTION_DEADLINE must be more than 0 seconds"),
    ("IPAAS_RETRY_BASE_DELAY", "inf", "IPAAS_RETRY_BASE_DELAY must be more than 0 seconds"),
    ("IPAAS_POLL_INTERVAL", "0", "IPAAS_POLL_INTERVAL must be more than 0 seconds"),
    ("IPAAS_SCHEDULER_INTERVAL", "-1", "IPAAS_SCHEDULER_INTERVAL must be more than 0 seconds"),
    ("IPAAS_LEASE_SECONDS", "-60", "IPAAS_LEASE_SECONDS must be more than 0 seconds"),
    ("IPAAS_LEASE_SECONDS", "1e12", "IPAAS_LEASE_SECONDS must be more than 0 seconds and at most 31536000"),
    ("IPAAS_BREAKER_FAILURES", "0", "IPAAS_BREAKER_FAILURES must be a whole number of 1 or more"),
    ("IPAAS_BREAKER_SUCCESSES", "2.5", "IPAAS_BREAKER_SUCCESSES must be a whole number of 1 or more"),
    ("IPAAS_BREAKER_RECOVERY_SECONDS", "-1", "IPAAS_BREAKER_RECOVERY_SECONDS must be more than 0 seconds"),
    ("IPAAS_ENGINE_PROCESSES", "-2", "IPAAS_ENGINE_PROCESSES must be a whole number from 0 to 64"),
    ("IPAAS_ENGINE_PROCESSES", "two", "IPAAS_ENGINE_PROCESSES must be a whole number"),
    ("IPAAS_ENGINE_NICE", "25", "IPAAS_ENGINE_NICE must be a whole number from 0 to 19"),
    ("IPAAS_ENGINE_SCHED_BATCH", "maybe", "IPAAS_ENGINE_SCHED_BATCH must be 1 or 0"),
    ("IPAAS_SCHEDULE_CATCH_UP", "colapse", "IPAAS_SCHEDULE_CATCH_UP must be collapse or skip, got 'colapse'"),
    ("IPAAS_ENGINE_LOOP", "uvlop", "IPAAS_ENGINE_LOOP must be uvloop or asyncio, got 'uvlop'"),
    ("IPAAS_HTTP_TRANSPORT", "httpxx", "IPAAS_HTTP_TRANSPORT must be aiohttp or httpx, got 'httpxx'"),
    ("IPAAS_DISABLE_ENGINE", "ture", "IPAAS_DISABLE_ENGINE must be 1 or 0"),
]


@pytest.mark.parametrize(("setting", "value", "expected"), ENGINE_REFUSED)
def test_bad_engine_settings_are_refused_in_one_line(setting: str, value: str, expected: str) -> None:
    with pytest.raises(SystemExit) as refused:
        EngineSettings.from_settings(Settings(extra={setting: value}))
    message = str(refused.value.code)
    assert expected in message and "\n" not in message, message


def test_empty_engine_settings_are_the_defaults() -> None:
    names = {setting for setting, _, _ in ENGINE_REFUSED}
    assert EngineSettings.from_settings(Settings(extra=dict.fromkeys(names, ""))) == EngineSettings.from_settings(Settings())


def test_engine_settings_read_as_documented() -> None:
    engine = EngineSettings.from_settings(
        Settings(extra={"IPAAS_MAX_QUEUE_DEPTH": "0", "IPAAS_SCHEDULE_CATCH_UP": "Skip", "IPAAS_ENGINE_PROCESSES": "0", "IPAAS_LEASE_SECONDS": "0.6", "IPAAS_HTTP_TRANSPORT": "httpx"})
    )
    assert (engine.max_queue_depth, engine.catch_up, engine.processes, engine.lease_seconds, engine.http_transport) == (0, "skip", 0, 0.6, "httpx")


@pytest.mark.parametrize(("queue", "share", "expected"), [("", "", 50_000), ("41", "", 21), ("1", "", 1), ("0", "", 0), ("100", "100", 100), ("100", "7", 7)])
def test_a_tenant_may_hold_half_the_queue_unless_told_otherwise(queue: str, share: str, expected: int) -> None:
    engine = EngineSettings.from_settings(Settings(extra={"IPAAS_MAX_QUEUE_DEPTH": queue, "IPAAS_MAX_TENANT_QUEUE_DEPTH": share}))
    assert engine.max_tenant_queue_depth == expected


@pytest.mark.parametrize("raw", ["inf", "-3", "nan", "1e10"])
def test_a_connection_age_that_grpc_cannot_take_is_refused(raw: str) -> None:
    with pytest.raises(SystemExit, match=r"^IPAAS_GRPC_MAX_CONNECTION_AGE must be 0 \(never\) or a number of seconds up to 2147483"):
        connection_age_options(raw)


@pytest.mark.parametrize("raw", ["0/10", "5/0", "-5/10", "nan/10", "inf/10", "5", "5/10/1", "5/2.5"])
def test_a_rate_tier_must_have_a_positive_rate_and_burst(raw: str) -> None:
    with pytest.raises(SystemExit, match=rf"^IPAAS_RATE_FREE must look like 5/10: a rate per second above 0, then a burst of 1 or more, got '{raw}'$"):
        parse_tiers({"IPAAS_RATE_FREE": raw})


def test_rate_tiers_read_as_documented() -> None:
    tiers = parse_tiers({"IPAAS_RATE_FREE": "0.5/4", "IPAAS_RATE_PAID": ""})
    assert (tiers["free"].rate, tiers["free"].burst, tiers["paid"].rate, tiers["paid"].burst) == (0.5, 4, 50.0, 100)
    assert (tiers["anonymous_webhooks"].rate, tiers["anonymous_webhooks"].burst) == (10.0, 100)
    assert parse_tiers({"IPAAS_RATE_ANONYMOUS_WEBHOOKS": "2/30"})["anonymous_webhooks"].burst == 30


def test_rate_limits_off_takes_the_usual_words() -> None:
    from ipaas.gateway.app import Gateway

    assert Gateway(Settings(extra={"IPAAS_RATE_LIMITS_OFF": "on"})).rate_limits_off is True
    assert Gateway(Settings(extra={"IPAAS_RATE_LIMITS_OFF": "0"})).rate_limits_off is False
    with pytest.raises(SystemExit, match="IPAAS_RATE_LIMITS_OFF must be 1 or 0"):
        Gateway(Settings(extra={"IPAAS_RATE_LIMITS_OFF": "of"}))


def test_a_unix_socket_redis_url_reaches_redis_not_valkey() -> None:
    """limits took a plain unix:// for Valkey's and refused it for want of the valkey package."""
    RateLimiter(parse_tiers({}), "unix:///run/redis.sock?db=0")
