"""SmtpEmailChannel's connection reuse against scripted sessions: the cases a real server
cannot be made to produce on cue. A message is tried again on a new connection only when
a kept connection fails on MAIL FROM (nothing of the message has left us), and once."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from services.notifier.channels import SmtpEmailChannel
from services.notifier.errors import PermanentSendError, ThrottledError, TransientSendError
from shared.notifications.policy import RenderedMessage

MAIL = RenderedMessage(channel="email", recipient="buyer@example.com",
                       template="t", subject="s", body="b\n")
OK: tuple[int, bytes] = (250, b"OK")


class Session:
    """Stands for smtplib.SMTP. `script`: command -> list of replies or exceptions, used
    in order (empty: 250 OK)."""

    def __init__(self, **script: list[Any]) -> None:
        self.script = script
        self.commands: list[str] = []
        self.closed = False
        self.sock = None

    def _do(self, command: str) -> tuple[int, bytes]:
        self.commands.append(command)
        steps = self.script.get(command) or []
        step = steps.pop(0) if steps else OK
        if isinstance(step, BaseException):
            raise step
        return step  # type: ignore[no-any-return]

    def ehlo_or_helo_if_needed(self) -> None:
        pass

    def mail(self, sender: str) -> tuple[int, bytes]:
        return self._do("mail")

    def rcpt(self, recipient: str) -> tuple[int, bytes]:
        return self._do("rcpt")

    def data(self, data: bytes) -> tuple[int, bytes]:
        return self._do("data")

    def rset(self) -> tuple[int, bytes]:
        return self._do("rset")

    def quit(self) -> tuple[int, bytes]:
        self.closed = True
        return self._do("quit")

    def close(self) -> None:
        self.closed = True


def channel(sessions: list[Session]) -> tuple[SmtpEmailChannel, list[Session]]:
    """A channel whose connections are the given sessions, in order."""
    ch = SmtpEmailChannel("127.0.0.1", 25, "noreply@shop.example")
    opened: list[Session] = []

    def connect() -> Any:
        if not sessions:
            raise ConnectionRefusedError("no more sessions in the script")
        opened.append(sessions.pop(0))
        return opened[-1]

    ch._connect = connect  # type: ignore[method-assign]
    return ch, opened


def test_kept_connection_dead_on_mail_is_retried_once_on_a_new_one() -> None:
    gone = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    first = Session(mail=[OK, gone])
    ch, opened = channel([first, Session()])
    ch.send(MAIL, "k1")
    ch.send(MAIL, "k2")
    assert opened[0].commands == ["mail", "rcpt", "data", "mail"] and opened[0].closed
    assert opened[1].commands == ["mail", "rcpt", "data"]


def test_a_new_connection_is_never_retried() -> None:
    gone = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    ch, opened = channel([Session(mail=[gone]), Session()])
    with pytest.raises(TransientSendError) as err:
        ch.send(MAIL, "k1")
    assert not err.value.maybe_sent
    assert len(opened) == 1


def test_retried_at_most_once() -> None:
    gone = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    ch, opened = channel([Session(mail=[OK, gone]), Session(mail=[gone]), Session()])
    ch.send(MAIL, "k1")
    with pytest.raises(TransientSendError):
        ch.send(MAIL, "k2")
    assert len(opened) == 2


def test_kept_connection_421_on_mail_is_its_goodbye_not_throttling() -> None:
    ch, opened = channel([Session(mail=[OK, (421, b"4.4.2 timeout exceeded")]), Session()])
    ch.send(MAIL, "k1")
    ch.send(MAIL, "k2")
    assert len(opened) == 2 and opened[1].commands == ["mail", "rcpt", "data"]


def test_421_on_a_new_connection_is_throttling() -> None:
    ch, opened = channel([Session(mail=[(421, b"4.7.0 too many connections")])])
    with pytest.raises(ThrottledError):
        ch.send(MAIL, "k1")
    assert opened[0].closed


@pytest.mark.parametrize("command", ["rcpt", "data"])
def test_kept_connection_lost_after_mail_is_not_retried(command: str) -> None:
    gone = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    ch, opened = channel([Session(**{command: [OK, gone]}), Session()])
    ch.send(MAIL, "k1")
    with pytest.raises(TransientSendError) as err:
        ch.send(MAIL, "k2")
    assert err.value.maybe_sent == (command == "data")
    assert len(opened) == 1 and opened[0].closed
    assert opened[0].commands.count("data") == (2 if command == "data" else 1)


def test_kept_connection_timing_out_on_mail_is_retried() -> None:
    # smtplib turns a read timeout into SMTPServerDisconnected: still before the message.
    slow = smtplib.SMTPServerDisconnected("Connection unexpectedly closed: timed out")
    ch, opened = channel([Session(mail=[OK, slow]), Session()])
    ch.send(MAIL, "k1")
    ch.send(MAIL, "k2")
    assert len(opened) == 2


def test_failed_rset_drops_the_connection() -> None:
    ch, opened = channel([
        Session(rcpt=[(550, b"5.1.1 unknown")], rset=[(421, b"bye")]), Session()])
    with pytest.raises(PermanentSendError):
        ch.send(MAIL, "k1")
    ch.send(MAIL, "k2")
    assert len(opened) == 2 and opened[0].closed
