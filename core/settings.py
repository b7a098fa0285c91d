"""Settings from environment variables, with defaults that need nothing installed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def flag(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUE_WORDS


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration setting: a number of seconds above 0 (the default when unset)."""
    raw = (env.get(name) or "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise SystemExit(f"{name} must be more than 0 seconds, got {raw!r}")
    return value


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
        grpc_listen = env.get("IPAAS_GRPC_LISTEN") or "127.0.0.1:50051"
        plugins = env.get("IPAAS_PLUGINS")
        return cls(
            data_dir=data_dir,
            database_url=env.get("IPAAS_DATABASE_URL") or f"sqlite:///{data_dir / 'ipaas.db'}",
            grpc_listen=grpc_listen,
            http_listen=env.get("IPAAS_HTTP_LISTEN") or "127.0.0.1:8080",
            core_target=env.get("IPAAS_CORE_TARGET") or grpc_listen,
            admin_key=env.get("IPAAS_ADMIN_KEY") or None,
            redis_url=env.get("IPAAS_REDIS_URL") or None,
            secret_keys=tuple(k.strip() for k in (env.get("IPAAS_SECRET_KEYS") or "").split(",") if k.strip()),
            plugins=None if plugins is None else frozenset(p.strip() for p in plugins.split(",") if p.strip()),
            allow_insecure_targets=flag(env.get("IPAAS_ALLOW_INSECURE_TARGETS")),
            workers=_int(env, "IPAAS_WORKERS", 0),
            log_level=(env.get("IPAAS_LOG_LEVEL") or "INFO").upper(),
            extra={k: v for k, v in env.items() if k.startswith("IPAAS_")},
        )
