"""The gateway's own settings (the shared ones, AMQP URL and queue type, come from
`shared.config.Settings`). Read once at start; a bad value stops the gateway with one line."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERSALES_", extra="ignore")

    gateway_port: int = Field(default=9105, ge=1, le=65535)
    # Only this machine by default; set 0.0.0.0 (behind the ingress) to take the platforms'
    # pushes from outside.
    gateway_bind: str = "127.0.0.1"
    # A request larger than this is refused before it is read whole (413).
    gateway_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    gateway_max_messages: int = Field(default=1000, ge=1, le=100_000)
    # Requests handled at once; beyond it uvicorn answers 503 and the platform retries
    # (bounds the memory that bodies in flight take).
    gateway_max_concurrency: int = Field(default=64, ge=1, le=10_000)
    # A folder with douyin.toml, kuaishou.toml and taobao.toml replacing the shipped ones.
    gateway_mappings: Path | None = None

    douyin_app_key: str | None = None
    douyin_app_secret: SecretStr | None = None
    kuaishou_app_key: str | None = None
    kuaishou_msg_secret: SecretStr | None = None  # 消息加密密钥: base64 of an AES key
    taobao_app_key: str | None = None
    taobao_app_secret: SecretStr | None = None

    @field_validator("gateway_mappings")
    @classmethod
    def _folder_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        return v

    def enabled_platforms(self) -> list[str]:
        pairs = {
            "douyin": (self.douyin_app_key, self.douyin_app_secret),
            "kuaishou": (self.kuaishou_app_key, self.kuaishou_msg_secret),
            "taobao": (self.taobao_app_key, self.taobao_app_secret),
        }
        return [p for p, (key, secret) in pairs.items() if key and secret]


def load_gateway_settings() -> GatewaySettings:
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise ConfigError(f"AFTERSALES_{field.upper()}: {err['msg']}") from None
    return settings
