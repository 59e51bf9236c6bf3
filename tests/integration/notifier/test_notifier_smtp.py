"""SmtpEmailChannel against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from notifier_fakes import (
    RecordingHandler,
    hang_up,
    make_self_signed_cert,
    password_authenticator,
    server_tls_context,
    start_smtp,
)

from services.notifier.channels import SmtpEmailChannel
from services.notifier.delivery import InMemoryRateLimiter, QuietHours, decide_and_send
from services.notifier.errors import (
    PermanentSendError,
    SendError,
    ThrottledError,
    TransientSendError,
)
from shared.notifications.policy import (
    NotificationPolicy,
    NotificationRequest,
    OpsContacts,
    RenderedMessage,
)
from tests.conftest import wait_for
from tests.resources import free_port

# Generated per run: not a real credential.
USER, PASSWORD = "notifier", "pw-" + socket.gethostname()

MAIL = RenderedMessage(
    channel="email", recipient="buyer@example.com", template="auto_approved.buyer",
    subject="您的售后申请 AS20261122001 已自动同意",
    body="您的售后单 AS20261122001 商家已超时未处理，系统已自动同意退款 ¥12.34。\n",
)
KEY = "0123456789abcdef0123456789abcdef"

ErrType = type[SendError]


def payload_text(msg: Message) -> str:
    raw = msg.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode("utf-8")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def plain_controller(handler: RecordingHandler) -> Iterator[Controller]:
    controller = start_smtp(handler, free_port())
    yield controller
    controller.stop()


@pytest.fixture
def plain_server(plain_controller: Controller) -> int:
    return int(plain_controller.port)


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
    with pytest.raises(PermanentSendError) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == "535"
    assert handler.received == []


def test_untrusted_certificate_is_permanent(starttls_server: int,
                                            handler: RecordingHandler) -> None:
    # The default context does not trust the test's self-signed certificate.
    ch = SmtpEmailChannel("127.0.0.1", starttls_server, "noreply@shop.example",
                          user=USER, password=PASSWORD, tls="starttls")
    with pytest.raises(PermanentSendError) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == "tls"
    assert handler.received == []


def test_starttls_asked_but_not_offered_is_permanent(plain_server: int) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", tls="starttls")
    with pytest.raises(PermanentSendError):
        ch.send(MAIL, KEY)


@pytest.mark.parametrize(
    "reply,kind,code",
    [
        ("550 5.1.1 <buyer@example.com>: Recipient address rejected: User unknown",
         PermanentSendError, "550"),
        ("553 5.7.1 Relaying denied", PermanentSendError, "553"),
        ("451 4.3.0 Temporary lookup failure", TransientSendError, "451"),
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
    with pytest.raises(TransientSendError) as err:
        ch.send(MAIL, KEY)
    assert not err.value.maybe_sent  # nothing left us: safe to retry


def test_connection_lost_during_data_is_not_retried(plain_server: int,
                                                    handler: RecordingHandler) -> None:
    handler.drop_after_data = True
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    with pytest.raises(TransientSendError) as err:
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
        "step": "merchant_inspection", "party": "merchant",
        "due_at": datetime(2026, 11, 30, 2, 0, tzinfo=UTC), "urgent": False,
        "params": {"refund_fen": 9990, "kind": "return_refund", "action": "auto_refund",
                   "missed_party": "merchant", "missed_step": "merchant_inspection",
                   "next_step": "refund_pending", "next_party": "platform",
                   "next_due_at": "2026-12-09T02:00:00+00:00"},
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
    assert ("商家未在 11月30日 10:00 前验货，系统已支持买家退款，退款 ¥99.90。"
            in body), body
    assert "下一步：平台需在 12月9日 10:00 前完成退款。" in body
    assert msg["Message-ID"] == f"<{req.dedup_key}@shop.example>"


# ---- connection reuse ------------------------------------------------------------------


def keys_received(handler: RecordingHandler) -> list[str]:
    return [str(message_from_bytes(m.content)["X-Aftersales-Key"]) for m in handler.received]


def test_messages_share_one_connection(plain_server: int, handler: RecordingHandler) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    for i in range(5):
        ch.send(MAIL, f"key-{i}")
    assert keys_received(handler) == [f"key-{i}" for i in range(5)]
    assert handler.connections() == 1


def test_auth_and_tls_once_per_connection(starttls_server: int, handler: RecordingHandler,
                                          certs: tuple[Path, Path]) -> None:
    ch = SmtpEmailChannel("127.0.0.1", starttls_server, "noreply@shop.example",
                          user=USER, password=PASSWORD, tls="starttls",
                          ssl_context=client_ctx(certs), timeout=5)
    for i in range(3):
        ch.send(MAIL, f"key-{i}")
    assert [m.login for m in handler.received] == [USER] * 3
    assert handler.connections() == 1


@pytest.mark.parametrize("goodbye", [None, b"421 4.4.2 mx.example Error: timeout exceeded\r\n"],
                         ids=["silent", "421"])
def test_connection_closed_by_the_server_between_sends_gets_the_next_mail_once(
    plain_controller: Controller, handler: RecordingHandler, goodbye: bytes | None
) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_controller.port, "noreply@shop.example",
                          timeout=5)
    ch.send(MAIL, "key-1")
    hang_up(plain_controller, handler.servers[0], goodbye)
    ch.send(MAIL, "key-2")  # the kept connection is dead: sent on a new one, no error
    ch.send(MAIL, "key-3")  # and that one is kept
    assert keys_received(handler) == ["key-1", "key-2", "key-3"]
    assert handler.connections() == 2


def test_server_idle_timeout_between_sends(handler: RecordingHandler) -> None:
    controller = start_smtp(handler, free_port(), timeout=0.5)  # aiosmtpd's idle timeout
    try:
        ch = SmtpEmailChannel("127.0.0.1", controller.port, "noreply@shop.example",
                              timeout=5)
        ch.send(MAIL, "key-1")
        server = handler.servers[0]
        wait_for(lambda: server.transport is None, timeout=5, interval=0.01,
                 what="the server to hang up on the idle connection")
        ch.send(MAIL, "key-2")
    finally:
        controller.stop()
    assert keys_received(handler) == ["key-1", "key-2"]
    assert handler.connections() == 2


def test_idle_or_busy_connections_are_replaced(plain_server: int,
                                               handler: RecordingHandler) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5,
                          max_messages_per_connection=2)
    for i in range(5):
        ch.send(MAIL, f"key-{i}")
    assert handler.connections() == 3  # 2 + 2 + 1
    handler.received.clear()
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5,
                          max_idle_s=0)
    ch.send(MAIL, "a")
    ch.send(MAIL, "b")
    assert handler.connections() == 2


def test_kept_connection_lost_during_data_is_not_retried(
    plain_server: int, handler: RecordingHandler
) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    ch.send(MAIL, "key-1")
    handler.drop_after_data = True
    with pytest.raises(TransientSendError) as err:
        ch.send(MAIL, "key-2")
    assert err.value.maybe_sent  # it may have been delivered: not sent again
    assert keys_received(handler) == ["key-1", "key-2"]
    handler.drop_after_data = False
    ch.send(MAIL, "key-3")  # a new connection for the next one
    assert keys_received(handler) == ["key-1", "key-2", "key-3"]
    assert handler.connections() == 2


def test_rejected_recipient_keeps_the_connection(plain_server: int,
                                                 handler: RecordingHandler) -> None:
    handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 <nobody@example.com>: unknown"
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    ch.send(MAIL, "key-1")
    bad = RenderedMessage(channel="email", recipient="nobody@example.com",
                          template=MAIL.template, subject=MAIL.subject, body=MAIL.body)
    with pytest.raises(PermanentSendError):
        ch.send(bad, "key-2")
    ch.send(MAIL, "key-3")
    assert keys_received(handler) == ["key-1", "key-3"]
    assert handler.connections() == 1


@pytest.mark.parametrize(
    "reply,kind",
    [("554 5.7.1 Message rejected as spam", PermanentSendError),
     ("451 4.3.0 Queue full, try later", TransientSendError)],
)
def test_refused_at_end_of_data_is_not_sent(plain_server: int, handler: RecordingHandler,
                                            reply: str, kind: ErrType) -> None:
    handler.data_reply = reply
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    with pytest.raises(kind) as err:
        ch.send(MAIL, KEY)
    assert err.value.code == reply[:3]
    assert not getattr(err.value, "maybe_sent", False)  # refused: safe to retry
    handler.data_reply = None
    ch.send(MAIL, KEY)
    assert keys_received(handler) == [KEY]
    assert handler.connections() == 1


def test_each_thread_has_its_own_connection(plain_server: int,
                                            handler: RecordingHandler) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_server, "noreply@shop.example", timeout=5)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(4):
                ch.send(MAIL, f"t{n}-{i}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(keys_received(handler)) == sorted(f"t{n}-{i}" for n in range(3)
                                                   for i in range(4))
    assert handler.connections() == 3


def test_close_ends_the_kept_connection(plain_controller: Controller,
                                        handler: RecordingHandler) -> None:
    ch = SmtpEmailChannel("127.0.0.1", plain_controller.port, "noreply@shop.example",
                          timeout=5)
    ch.send(MAIL, "key-1")
    server = handler.servers[0]
    ch.close()
    # QUIT: the server closes its side
    wait_for(lambda: server.transport is None, timeout=5, interval=0.01,
             what="the server's side of the connection to close")
    ch.send(MAIL, "key-2")
    assert handler.connections() == 2
