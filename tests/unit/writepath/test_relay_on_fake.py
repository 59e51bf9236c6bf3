"""The outbox relay on the in-memory outbox: rows go only once the broker confirmed
them, in id order; a broker failure keeps every unconfirmed row; a standby publishes
nothing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.resolver.outbox import OutboxRelay
from shared.confirms import PartlyConfirmed
from shared.db.fake import FakeDatabase, FakeRelayStore
from shared.db.outbox import DecisionRecord


class Broker:
    def __init__(self, confirm_first: int | None = None) -> None:
        self.published: list[str] = []
        self.confirm_first = confirm_first  # None: all; else fail after this many

    def publish_batch(self, messages: list[tuple[str, str, bytes, str, dict | None]]) -> None:
        if self.confirm_first is not None:
            self.published += [m[3] for m in messages[:self.confirm_first]]
            raise PartlyConfirmed(ConnectionError("broker away"),
                                  list(range(self.confirm_first)))
        self.published += [m[3] for m in messages]

    def close(self) -> None:
        pass


def decided(store: FakeDatabase, count: int) -> list[str]:
    ids = [f"d{i}" for i in range(count)]
    with store() as uow:
        uow.outbox.add_decisions([DecisionRecord(
            i, "AS1", "decision.auto_approved", "merchant_response",
            datetime(2026, 11, 22, tzinfo=UTC), {"decision_id": i}, "aftersales.decisions",
            "decision.auto_approved") for i in ids])
        uow.commit()
    return ids


def test_rows_are_published_in_order_and_deleted_after_the_confirms() -> None:
    store = FakeDatabase()
    ids = decided(store, 5)
    broker = Broker()
    relay = OutboxRelay(FakeRelayStore(store), broker, batch=3)
    assert relay.relay_once() == ["decision.auto_approved"] * 3
    assert relay.relay_once() == ["decision.auto_approved"] * 2
    assert broker.published == ids and not store.tables.outbox


def test_a_broker_failure_mid_batch_keeps_only_the_unconfirmed_rows() -> None:
    store = FakeDatabase()
    ids = decided(store, 4)
    relay = OutboxRelay(FakeRelayStore(store), Broker(confirm_first=1), batch=10)
    with pytest.raises(ConnectionError):
        relay.relay_once()
    assert [m.message_id for m in store.tables.outbox.values()] == ids[1:]
    broker = Broker()
    relay.publisher = broker
    relay.relay_once()
    assert broker.published == ids[1:] and not store.tables.outbox


def test_a_standby_publishes_nothing() -> None:
    store = FakeDatabase()
    decided(store, 2)
    standby = FakeRelayStore(store)
    standby.other_leads = True
    broker = Broker()
    assert OutboxRelay(standby, broker, batch=10).relay_once() == []
    assert broker.published == [] and len(store.tables.outbox) == 2
