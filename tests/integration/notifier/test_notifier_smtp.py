"""SmtpEmailChannel against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path

import pytest
from notifier_fakes import (
    RecordingHandler,
    make_self_signed_cert,
    password_authenticator,
    server_tls_context,
    start_smtp,
)

from services.notifier.channels import SmtpEmailChannel
from services.notifier.delivery import InMemoryRateLimiter, QuietHours, decide_and_send
from services.notifier.errors import (
    NotifierError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from shared.notifications.policy import (
    NotificationPolicy,
    NotificationRequest,
    OpsContacts,
    RenderedMessage,
)

# Generated per run: not a real credential.
USER, PASSWORD = "notifier", "pw-" + socket.gethostname()

MAIL = RenderedMessage(
    channel="email", recipient="buyer@example.com", template="auto_approved.buyer",
    subject="您的售后申请 AS20261122001 已自动同意",
    body="您的售后单 AS20261122001 商家已超时未处理，系统已自动同意退款 ¥12.34。\n",
)
KEY = "0123456789abcdef0123456789abcdef"

ErrType = type[NotifierError]


def payload_text(msg: Message) -> str:
    raw = msg.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode("utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def plain_server(handler: RecordingHandler) -> Iterator[int]:
    port = free_port()
    controller = start_smtp(handler, port)
    yield port
    controller.stop()


@pytest.fixture
def starttls_server(handler: RecordingHandler, certs: tuple[Path, Path]) -> Iterator[int]:
    port = free_port()
    controller = start_smtp(
        handler, port,
        tls_context=server_tls_context(*certs), require_starttls=True,
        authenticator=password_authenticator(USER, PASSWORD), auth_require_tls=True,
        auth_required=True,
    )
    yield port
    controller.stop()


@pytest.fixture
def implicit_tls_server(handler: RecordingHandler, certs: tuple[Path, Path]) -> Iterator[int]:
    port = free_port()
    controller = start_smtp(
        handler, port,
        ssl_context=server_tls_context(*certs),
        # aiosmtpd does not count implicit TLS as "TLS" for AUTH; the whole session is
        # encrypted here, so allowing AUTH is what a real relay on port 465 does.
        authenticator=password_authenticator(USER, PASSWORD), auth_required=True,
        auth_require_tls=False,
    )
    yield port
    controller.stop()


def client_ctx(certs: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs[0]))


def check_delivered(handler: RecordingHandler, login: str | None = None) -> None:
    # aiosmtpd runs handle_DATA before it answers DATA, so the mail is recorded by the
    # time send() returns: no waiting needed.
    assert len(handler.received) == 1
    got = handler.received[0]
    assert got.rcpt_tos == ["buyer@example.com"]
    assert got.mail_from == "noreply@shop.example"
    assert got.login == login
    msg = message_from_bytes(got.content)
    assert str(make_header(decode_header(msg["Subject"]))) == MAIL.subject
    assert str(make_header(decode_header(msg["From"]))) == "售后服务 <noreply@shop.example>"
    assert msg["To"] == "buyer@example.com"
    assert msg["Message-ID"] == f"<{KEY}@shop.example>"
    assert msg["X-Aftersales-Key"] == KEY
    assert msg.get_content_charset() == "utf-8"
    assert payload_text(msg) == MAIL.body


def test_plain_smtp_delivers_chinese_mail(plain_server: int, handler: RecordingHandler) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "售后服务 <noreply@shop.example>")
    result = ch.send(MAIL, KEY)
    assert result.provider_id == f"<{KEY}@shop.example>"
    check_delivered(handler)


def test_starttls_with_auth(starttls_server: int, handler: RecordingHandler,
                            certs: tuple[Path, Path]) -> None:
    ch = SmtpEmailChannel("127.0.0.1", starttls_server, "售后服务 <noreply@shop.example>",
                          user=USER, password=PASSWORD, tls="starttls",
                          ssl_context=client_ctx(certs))
    ch.send(MAIL, KEY)
    check_delivered(handler, login=USER)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls_with_auth(implicit_tls_server: int, handler: RecordingHandler,
                                certs: tuple[Path, Path]) -> None:
    ch = SmtpEmailChannel("127.0.0.1", implicit_tls_server, "售后服务 <noreply@shop.example>",
                          user=USER, password=PASSWORD, tls="tls",
                          ssl_context=client_ctx(certs))
    ch.send(MAIL, KEY)
    check_delivered(handler, login=USER)


def test_wrong_password_is_permanent(starttls_server: int, handler: RecordingHandler,
                                     certs: tuple[Path, Path]) -> None:
    ch = SmtpEmailChannel("127.0.0.1", starttls_server, "noreply@shop.example",
                          user=USER, password="wrong", tls="starttls",
                          ssl_context=client_ctx(certs))
    with pytest.raises(PermanentError) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == "535"
    assert handler.received == []


def test_untrusted_certificate_is_permanent(starttls_server: int,
                                            handler: RecordingHandler) -> None:
    # The default context does not trust the test's self-signed certificate.
    ch = SmtpEmailChannel("127.0.0.1", starttls_server, "noreply@shop.example",
                          user=USER, password=PASSWORD, tls="starttls")
    with pytest.raises(PermanentError) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == "tls"
    assert handler.received == []


def test_starttls_asked_but_not_offered_is_permanent(plain_server: int) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", tls="starttls")
    with pytest.raises(PermanentError):
        ch.send(MAIL, KEY)


@pytest.mark.parametrize(
    "reply,kind,code",
    [
        ("550 5.1.1 <buyer@example.com>: Recipient address rejected: User unknown",
         PermanentError, "550"),
        ("553 5.7.1 Relaying denied", PermanentError, "553"),
        ("451 4.3.0 Temporary lookup failure", TransientError, "451"),
        ("450 4.2.1 Mailbox busy, try again later", ThrottledError, "450"),
        ("452 4.5.3 Too many recipients", ThrottledError, "452"),
        ("421 4.7.0 Too many messages, slow down", ThrottledError, "421"),
    ],
)
def test_smtp_replies_are_classified(plain_server: int, handler: RecordingHandler,
                                     reply: str, kind: ErrType, code: str) -> None:
    handler.rcpt_replies["buyer@example.com"] = reply
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example")
    with pytest.raises(kind) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == code
    assert handler.received == []


def test_connection_refused_is_transient() -> None:
    ch = SmtpEmailChannel("127.0.0.1", free_port(), "noreply@shop.example", timeout=2)
    with pytest.raises(TransientError) as err:
        ch.send(MAIL, KEY)
    assert not err.value.maybe_sent  # nothing left us: safe to retry


def test_connection_lost_during_data_is_not_retried(plain_server: int,
                                                    handler: RecordingHandler) -> None:
    handler.drop_after_data = True
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    with pytest.raises(TransientError) as err:
        ch.send(MAIL, KEY)
    assert err.value.maybe_sent
    assert len(handler.received) == 1  # the server did take it
    req = NotificationRequest(
        dedup_key=KEY, case_id="AS1", reason="decision.auto_approved", party="buyer",
        channel="email", recipient=MAIL.recipient, template=MAIL.template, params={},
        urgent=True,
    )
    result = decide_and_send(req, ch, now=datetime.now(UTC), attempt=1,
                             limiter=InMemoryRateLimiter(), quiet_hours=QuietHours(),
                             render=lambda r: MAIL)
    assert result.status == "failed" and result.error_kind == "ambiguous"
    assert len(handler.received) == 2  # that one call, and no automatic second one


def test_policy_to_mailbox_end_to_end(plain_server: int, handler: RecordingHandler) -> None:
    policy = NotificationPolicy.load()
    notice = {
        "reason": "decision.auto_refunded", "case_id": "AS20261122009",
        "step": "merchant_receive_refund", "party": "merchant",
        "due_at": datetime(2026, 11, 30, 2, 0, tzinfo=UTC), "urgent": False,
        "params": {"refund_fen": 9990},
    }
    contacts = {"buyer": {"email": "buyer@example.com"}}
    (req,) = policy.expand(notice, contacts, OpsContacts())
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "售后服务 <noreply@shop.example>")
    result = decide_and_send(
        req, ch, now=datetime(2026, 11, 30, 3, 0, tzinfo=UTC),  # 11:00 in Shanghai
        attempt=1, limiter=InMemoryRateLimiter(), quiet_hours=QuietHours(), render=policy.render,
    )
    assert result.status == "sent"
    msg = message_from_bytes(handler.received[0].content)
    assert str(make_header(decode_header(msg["Subject"]))) == (
        "您的售后单 AS20261122009 已由平台支持退款"
    )
    body = payload_text(msg)
    assert "已由平台支持退款 ¥99.90，款项将原路退回" in body
    assert msg["Message-ID"] == f"<{req.dedup_key}@shop.example>"
