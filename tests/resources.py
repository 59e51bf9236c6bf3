"""Resources of their own for a test session or a benchmark run: a free port, a PostgreSQL
database and a RabbitMQ vhost that are created for the run and dropped after it.

Used by `tests/conftest.py`, `tests/harness.py` and the scripts in `bench/`, so that the tests
and the benchmarks set up the same way. A missing service makes these fail, never skip.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from shared.db.migrate import upgrade


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl not found: tests and benchmarks create their own vhost "
                           "with it")
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def unmigrated_database(admin_url: str, name: str) -> Iterator[tuple[str, Engine]]:
    """An empty database of the test's own (no schema: the test migrates it), with an
    engine on it; both gone afterwards."""
    with own_database(admin_url, name, migrate=False) as url:
        engine = create_engine(url)
        try:
            yield url, engine
        finally:
            engine.dispose()


@contextlib.contextmanager
def own_database(admin_url: str, name: str, *, migrate: bool = True) -> Iterator[str]:
    """Create database `name` next to `admin_url`'s, bring it to the newest schema, yield its
    URL, and drop it afterwards (its connections too)."""
    # pre-ping: other work on the machine (the fault tests) may restart PostgreSQL meanwhile;
    # the drop at the end needs a live link.
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        for attempt in range(30):  # PostgreSQL may be restarting
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except OperationalError:
                if attempt == 29:
                    raise
                time.sleep(2.0)
        admin.dispose()


@contextlib.contextmanager
def own_vhost(name: str, host: str = "127.0.0.1:5672") -> Iterator[str]:
    """Create RabbitMQ vhost `name` (user guest may use it), yield its AMQP URL, delete it
    afterwards."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}/{quote(name, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", name)


def write_sms_codes(folder: Path) -> Path:
    """An `AFTERSALES_SMS_TEMPLATES` file in `folder` giving every shipped SMS template an
    Aliyun and a Tencent template code (providers need one per template)."""
    shipped = tomllib.loads(Path("shared/notifications/templates/sms.toml").read_text())
    codes = folder / "sms-codes.toml"
    codes.write_text("".join(f'["{name}"]\naliyun = "SMS_{i:06d}"\ntencent = "{100000 + i}"\n'
                             for i, name in enumerate(shipped)))
    return codes
