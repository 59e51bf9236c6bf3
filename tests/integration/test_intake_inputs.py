"""One regression test per class of bad input, each through the real broker and the
running intake process (`aftersales run intake`): the message gets its verdict, the
events after it are applied, and the worker process is the same one at the end.

Classes: deep nesting, big integers, lone surrogates, lax types, implausible dates,
routing headers, unencodable headers, oversized bodies, same id with other content,
parked events whose case never opens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from shared.db.models import CaseEventRow, CaseRow, EventConflictRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import System, rejected_messages
from tests.intake_service import intake_service, metric_sum, worker_pids
from tests.poison import (
    DeepTable,
    Ids,
    Message,
    RawTimestamp,
    encode,
    follow_up,
    nested,
    opened,
    publish_messages,
)

pytestmark = pytest.mark.integration

PARKED_MAX_SECONDS = 2


@dataclass
class Intake:
    system: System
    pids: set[int]
    last_good_ids: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def intake(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Intake]:
    with intake_service(database_url, amqp_url, tmp_path_factory.mktemp("intake"),
                        intake_parked_max_seconds=str(PARKED_MAX_SECONDS),
                        intake_parked_sweep_seconds="0.5") as system:
        intake = Intake(system, worker_pids(system))
        yield intake
        # No input of the whole module ended (or restarted) a worker.
        assert worker_pids(system) == intake.pids
        assert "exited with" not in system.log("intake")


@pytest.fixture
def ids() -> Ids:
    return Ids(f"in{datetime.now(UTC):%H%M%S%f}")


def count(db: Database, stmt: Any) -> int:
    with db.transaction() as s:
        return int(s.execute(stmt).scalar_one())


def now() -> datetime:
    return datetime.now(UTC)


def bad(doc: dict[str, Any]) -> Message:
    return Message(encode(doc))


def cases() -> list[tuple[str, Any]]:
    """(input class, builder of bad messages and the expected (reason, detail part))."""
    return [
        ("deep_nesting", lambda ids: [
            (bad(opened(ids, now(), extra=nested(300))), "too_deep", "levels deep"),
            (Message(b"[" * 30_000 + b"]" * 30_000), "too_deep", "levels deep"),
            (Message(b'{"a":' * 5000 + b"1" + b"}" * 5000), "too_deep", "levels deep"),
        ]),
        ("big_integers", lambda ids: [
            (bad(opened(ids, now(), amount_fen=2**63)), "out_of_range", "data.amount_fen"),
            (bad(opened(ids, now(), extra=[1, -(2**63) - 1])), "out_of_range", "64-bit"),
            (bad({**opened(ids, now()), "trace": 10**40}), "out_of_range", "trace"),
            (Message(encode(opened(ids, now())).replace(b"12900", b"1e400")),
             "out_of_range", "double"),
        ]),
        ("lone_surrogates", lambda ids: [
            (bad(opened(ids, now(), reason="坏了\ud83d")), "invalid_text", "lone surrogate"),
            (bad({**opened(ids, now()), "case_id": "AS\udc00"}), "invalid_text", "case_id"),
            (bad(opened(ids, now(), **{"k\ud800": 1})), "invalid_text", "lone surrogate"),
        ]),
        ("lax_types", lambda ids: [
            (bad(opened(ids, now(), amount_fen="100")), "schema", "valid integer"),
            (bad(opened(ids, now(), amount_fen=True)), "schema", "valid integer"),
            (bad(opened(ids, now(), amount_fen=100.0)), "schema", "valid integer"),
            (bad({**opened(ids, now()), "occurred_at": int(now().timestamp())}), "schema",
             "RFC 3339"),
            (bad({**opened(ids, now()), "schema_version": True}), "schema", "schema_version"),
            (bad({**opened(ids, now()), "shop_id": 1}), "schema", "shop_id"),
            (bad({**opened(ids, now()), "case_id": "AS\u200b1"}), "schema", "U+200B"),
            (bad(opened(ids, now(), buyer={"email": "a\u202e@example.com"})), "schema",
             "email"),
        ]),
        ("implausible_dates", lambda ids: [
            (bad({**opened(ids, now()), "occurred_at": "1970-01-01T00:00:00Z"}),
             "implausible_time", "occurred_at 1970-01-01"),
            (bad({**opened(ids, now()),
                  "occurred_at": (now() + timedelta(minutes=30)).isoformat()}),
             "implausible_time", "after intake received it"),
            (bad({**opened(ids, now()), "type": "deadline.changed", "data": {},
                  "due_at": "2999-01-01T00:00:00Z"}), "implausible_time", "due_at"),
        ]),
        ("oversized_bodies", lambda ids: [
            (Message(b'{"pad": "' + b"x" * (70 * 1024) + b'"}'), "oversized", "limit 65536"),
            (bad(opened(ids, now(), evidence=["https://x/" + "y" * 1900] * 40)), "oversized",
             "limit 65536"),
        ]),
    ]


def _run(intake: Intake, db: Database, amqp_url: str, ids: Ids,
         messages: list[tuple[Message, str, str]]) -> list[tuple[bytes, dict[str, Any]]]:
    """Publish the bad messages, each followed by a valid event; wait for all verdicts."""
    good = [opened(ids, now()) for _ in messages]
    stream: list[Message] = []
    for (msg, _reason, _detail), event in zip(messages, good, strict=True):
        stream += [msg, Message(encode(event))]
    intake.last_good_ids = {e["event_id"] for e in good}
    publish_messages(amqp_url, stream)
    cases = select(func.count()).select_from(CaseRow).where(
        CaseRow.case_id.in_([e["case_id"] for e in good]))
    wait_for(lambda: count(db, cases) == len(good), what="every valid event applied")
    got: list[tuple[bytes, dict[str, Any]]] = []
    wait_for(lambda: got.extend(rejected_messages(amqp_url)) or len(got) >= len(messages),
             what="every bad message in aftersales.events.rejected")
    assert len(got) == len(messages)
    assert worker_pids(intake.system) == intake.pids
    return got


@pytest.mark.parametrize(("input_class", "build"), cases(), ids=[c[0] for c in cases()])
def test_each_bad_input_class_is_rejected_with_its_reason_and_intake_goes_on(
    intake: Intake, db: Database, amqp_url: str, ids: Ids, input_class: str, build: Any
) -> None:
    messages: list[tuple[Message, str, str]] = build(ids)
    got = _run(intake, db, amqp_url, ids, messages)
    by_body = {body: headers for body, headers in got}
    for msg, reason, detail in messages:
        headers = by_body.get(msg.body)
        assert headers is not None, f"{input_class}: {msg.body[:80]!r} not rejected unchanged"
        assert headers["x-reject-reason"] == reason, (input_class, headers)
        assert detail in headers["x-reject-detail"], (input_class, headers)
    # Nothing of them reached a case log: only the valid events between them are there.
    with db.transaction() as s:
        logged = set(s.execute(select(CaseEventRow.event_id)).scalars())
    assert logged == intake.last_good_ids


def test_routing_headers_are_not_copied_and_route_nothing(
    intake: Intake, db: Database, amqp_url: str, ids: Ids
) -> None:
    """CC/BCC on a rejected message: the copy must not carry them (the broker would route
    a copy back into intake's queue, or anywhere)."""
    msg = Message(b"{not json", {"CC": ["aftersales.events.intake"],
                                 "BCC": ["aftersales.events.intake"],
                                 "cc": ["aftersales.events.intake"], "trace": "t-1"})
    got = _run(intake, db, amqp_url, ids, [(msg, "invalid_json", "not JSON")])
    (_body, headers), = got
    assert not {"CC", "BCC", "cc"} & set(headers), headers
    assert headers["trace"] == "t-1"  # useful headers are kept
    assert "CC" in headers["x-dropped-headers"]
    # Exactly one copy, and intake handled the message once (no copy routed back to it).
    assert rejected_messages(amqp_url) == []
    # The counter is incremented after the copy is published and the message acked.
    wait_for(lambda: metric_sum(intake.system, "aftersales_events_rejected_total",
                                reason="invalid_json") >= 1, what="the rejection counted")
    assert metric_sum(intake.system, "aftersales_events_rejected_total",
                      reason="invalid_json") == 1


def test_headers_pika_cannot_encode_never_wedge_the_consumer(
    intake: Intake, db: Database, amqp_url: str, ids: Ids
) -> None:
    """A Java producer's `double` header (pika decodes it to a float, then cannot encode
    it): before, publishing the rejected copy raised, the worker died and was restarted,
    got the same message again and died again, forever."""
    messages = [
        (Message(b"\xff\xfe", {"score": 0.5, "big": 1e300, "n": 3}), "not_utf8", "UTF-8"),
        (Message(b"[1]", {"nested": {"weight": 1.25, "list": [0.5, "a"]}}), "schema",
         "JSON object"),
        # A timestamp no datetime holds: pika's decoder raised inside the connection, which
        # dropped; the message came back and dropped it again, forever.
        (Message(b"{}", {"at": RawTimestamp(2**63 - 1), "ok": RawTimestamp(1764000000)}),
         "schema", "event_id"),
        # A table nested 2,000 levels deep: pika's decoder hit the recursion limit inside
        # the connection, with the same endless redelivery.
        (Message(b"null", {"deep": DeepTable(2000), "trace": "t"}), "schema", "JSON object"),
    ]
    got = _run(intake, db, amqp_url, ids, messages)
    headers = {body: h for body, h in got}
    assert headers[b"\xff\xfe"]["score"] == "0.5" and headers[b"\xff\xfe"]["n"] == 3
    assert headers[b"\xff\xfe"]["big"] == "1e+300"
    assert headers[b"[1]"]["nested"] == {"weight": "1.25", "list": ["0.5", "a"]}
    assert headers[b"{}"]["at"] == 2**63 - 1  # its number, as an integer
    assert headers[b"{}"]["ok"] == datetime.fromtimestamp(1764000000, UTC)
    assert headers[b"null"]["trace"] == "t" and isinstance(headers[b"null"]["deep"], dict)


def test_same_event_id_with_other_content_is_a_conflict_not_a_duplicate(
    intake: Intake, db: Database, amqp_url: str, ids: Ids
) -> None:
    first = opened(ids, now())
    resent = json.dumps(dict(reversed(list(first.items()))), indent=1).encode()  # same event
    changed = {**first, "data": {**first["data"], "amount_fen": 1}}  # same id, other amount
    marker = opened(ids, now())
    publish_messages(amqp_url, [Message(encode(first)), Message(resent),
                                Message(encode(changed)), Message(encode(marker))])
    wait_for(lambda: count(db, select(func.count()).select_from(CaseRow)
                           .where(CaseRow.case_id == marker["case_id"])) == 1,
             what="the marker event applied")
    with db.transaction() as s:
        conflicts = s.execute(select(EventConflictRow)).scalars().all()
        row = s.get(CaseEventRow, first["event_id"])
        case = s.get(CaseRow, first["case_id"])
    assert [(c.event_id, c.body["data"]["amount_fen"]) for c in conflicts] == [
        (first["event_id"], 1)]
    assert row is not None and row.body["data"]["amount_fen"] == 12900  # the first stays
    assert case is not None and case.snapshot["amount_fen"] == 12900
    assert metric_sum(intake.system, "aftersales_events_received_total",
                      outcome="conflict") >= 1
    assert rejected_messages(amqp_url) == []


def test_a_parked_event_whose_case_never_opens_expires_to_the_rejected_queue(
    intake: Intake, db: Database, amqp_url: str, ids: Ids
) -> None:
    never = opened(ids, now())  # never published: its case never opens
    orphan = follow_up(never, ids)
    later = opened(ids, now())  # opened soon after its follow-up: applied, not expired
    waiting = follow_up(later, ids)
    before = metric_sum(intake.system, "aftersales_events_rejected_total",
                        reason="case_never_opened")
    publish_messages(amqp_url, [Message(encode(orphan)), Message(encode(waiting)),
                                Message(encode(later))])
    got: list[tuple[bytes, dict[str, Any]]] = []
    wait_for(lambda: got.extend(rejected_messages(amqp_url)) or got, timeout=30,
             what="the parked event to expire")
    (body, headers), = got
    assert headers["x-reject-reason"] == "case_never_opened"
    assert json.loads(body)["event_id"] == orphan["event_id"]
    assert never["case_id"] in headers["x-reject-detail"]

    def outcome(event_id: str) -> str | None:
        with db.transaction() as s:
            row = s.get(CaseEventRow, event_id)
            return None if row is None else row.outcome

    # The sweep publishes the copy before it commits the row's new outcome.
    wait_for(lambda: outcome(orphan["event_id"]) == "expired", what="the row marked expired")
    assert outcome(waiting["event_id"]) == "applied"
    wait_for(lambda: metric_sum(intake.system, "aftersales_events_rejected_total",
                                reason="case_never_opened") == before + 1,
             what="the expiry counted")
    wait_for(lambda: metric_sum(intake.system, "aftersales_parked_events") == 0,
             what="the parked gauge back to 0")
