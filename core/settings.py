"""Settings from environment variables, with defaults that need nothing installed."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
MAX_WORKERS = 10_000


def flag(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUE_WORDS


# Past a year a duration is a typo, and datetime arithmetic with it (a lease's expiry, a
# retry's run time) overflows near 10**11 seconds.
MAX_SECONDS = 365 * 24 * 3600


def whole_number(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A count setting: a whole number from minimum to maximum (the default when unset or
    empty). 1e5 is read as 100000, as these settings were read before; 2.5 is refused
    rather than cut to 2."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    value: int | float
    try:
        value = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
    whole = isinstance(value, int) or value.is_integer()  # False for nan and inf
    if not (whole and minimum <= value and (maximum is None or value <= maximum)):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of {minimum} or more"
        raise SystemExit(f"{name} must be a whole number {bounds}, got {raw!r}")
    return int(value)


def seconds(env: Mapping[str, str], name: str, default: float, maximum: float = MAX_SECONDS, allow_zero: bool = False) -> float:
    """A duration setting: a number of seconds above 0 (or 0 too, with allow_zero) and at
    most maximum (the default when unset or empty)."""
    raw = (env.get(name) or "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (0 <= value if allow_zero else 0 < value) or not value <= maximum:  # also refuses nan
        least = "0 seconds or more" if allow_zero else "more than 0 seconds"
        raise SystemExit(f"{name} must be {least} and at most {maximum:.0f}, got {raw!r}")
    return value


def boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An on/off setting. Anything but the usual words is refused: a typo of "true" read as
    off would turn a feature off without a word."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS | FALSE_WORDS:
        return raw in TRUE_WORDS
    raise SystemExit(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {env.get(name)!r}")


def choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """One of a few words (the default when unset or empty), in any case."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise SystemExit(f"{name} must be {' or '.join(choices)}, got {env.get(name)!r}")
    return raw


def listen_address(env: Mapping[str, str], name: str, default: str, any_port: bool = False) -> str:
    """host:port to listen on (an IPv6 host in brackets). Port 0 (any free port) only where
    any_port: the core logs the port it got, which tests use; a gateway on an unknown port
    serves no one."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    host, colon, port = raw.rpartition(":")
    lowest = 0 if any_port else 1
    bracketed = host.startswith("[") and host.endswith("]")
    if not (colon and port.isascii() and port.isdigit() and lowest <= int(port) <= 65535 and (bracketed or ":" not in host)):
        raise SystemExit(f"{name} must be host:port with a port from {lowest} to 65535 (an IPv6 host in brackets, [::1]:8080), got {raw!r}")
    return raw


# gRPC name-resolver schemes (gRPC's naming doc); a target in one of them is gRPC's to check.
GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def core_target(env: Mapping[str, str], default: str) -> str:
    """Where the gateway reaches the core: a gRPC target. A bare host:port must name its port
    (gRPC would take 443 in silence), and an http:// or grpc:// URL is not a gRPC target (gRPC
    would read it as a host name): either left the gateway answering 503 for ever."""
    raw = (env.get("IPAAS_CORE_TARGET") or "").strip()
    if not raw:
        return default
    if raw.startswith(GRPC_TARGET_SCHEMES):
        return raw
    if "://" in raw:
        raise SystemExit(f"IPAAS_CORE_TARGET must be a gRPC target (host:port, dns:///host:port, ipv4:host:port,host:port or unix:path), not a URL, got {raw!r}")
    return listen_address({"IPAAS_CORE_TARGET": raw}, "IPAAS_CORE_TARGET", default)


REDIS_SCHEMES = ("redis", "rediss", "unix")
HTTP_TRANSPORTS = ("aiohttp", "httpx")  # IPAAS_HTTP_TRANSPORT, the first the default
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _redis_url(env: Mapping[str, str]) -> str | None:
    raw = (env.get("IPAAS_REDIS_URL") or "").strip()
    if raw and not raw.startswith(tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)):
        # Without the value: a Redis URL may hold a password.
        raise SystemExit("IPAAS_REDIS_URL must be a redis://, rediss:// or unix:// URL (redis://host:6379/0)")
    return raw or None


MIN_ADMIN_KEY_LENGTH = 32


def _admin_key(env: Mapping[str, str]) -> str | None:
    """A chosen admin key is at least as hard to guess as it is long: `IPAAS_ADMIN_KEY=a`
    made `Bearer a` the platform's admin (security audit F8). The generated key has 256
    random bits. The key is not repeated: it is a secret."""
    key = env.get("IPAAS_ADMIN_KEY") or None
    if key is not None and (len(key) < MIN_ADMIN_KEY_LENGTH or not key.isascii() or not key.isprintable() or " " in key):
        raise SystemExit(f"IPAAS_ADMIN_KEY must be at least {MIN_ADMIN_KEY_LENGTH} printable ASCII characters without spaces (leave it unset to have one generated)")
    return key


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("IPAAS_LOG_LEVEL") or "").strip().upper() or "INFO"
    # WARN and FATAL too: logging takes them, and a platform running with them kept working.
    if level not in logging.getLevelNamesMapping() or level == "NOTSET":
        raise SystemExit(f"IPAAS_LOG_LEVEL must be {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, got {env.get('IPAAS_LOG_LEVEL')!r}")
    return level


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".ipaas")
    database_url: str = ""
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8080"
    core_target: str = "127.0.0.1:50051"
    admin_key: str | None = None
    redis_url: str | None = None
    secret_keys: tuple[str, ...] = ()
    plugins: frozenset[str] | None = None
    allow_insecure_targets: bool = False
    workers: int = 0
    log_level: str = "INFO"
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        data_dir = Path(env.get("IPAAS_DATA_DIR") or ".ipaas")
        grpc_listen = listen_address(env, "IPAAS_GRPC_LISTEN", "127.0.0.1:50051", any_port=True)
        # No name (empty, blanks, commas) is the default, every installed connector, as for
        # every setting: a unit file passing IPAAS_PLUGINS=${IPAAS_PLUGINS} through unset made
        # an allow-list of nothing.
        plugins = frozenset(p.strip() for p in (env.get("IPAAS_PLUGINS") or "").split(",") if p.strip()) or None
        return cls(
            data_dir=data_dir,
            database_url=env.get("IPAAS_DATABASE_URL") or f"sqlite:///{data_dir / 'ipaas.db'}",
            grpc_listen=grpc_listen,
            http_listen=listen_address(env, "IPAAS_HTTP_LISTEN", "127.0.0.1:8080"),
            core_target=core_target(env, grpc_listen),
            admin_key=_admin_key(env),
            redis_url=_redis_url(env),
            secret_keys=tuple(k.strip() for k in (env.get("IPAAS_SECRET_KEYS") or "").split(",") if k.strip()),
            plugins=plugins,
            allow_insecure_targets=boolean(env, "IPAAS_ALLOW_INSECURE_TARGETS", False),
            # 0: the dispatcher's default, 16 per CPU. More than this is a typo, not a load one
            # process can drive; below 0 the dispatcher never claimed a task.
            workers=whole_number(env, "IPAAS_WORKERS", 0, maximum=MAX_WORKERS),
            log_level=_log_level(env),
            extra={k: v for k, v in env.items() if k.startswith("IPAAS_")},
        )
