"""The flow tables themselves (shared/domain/flows.py), pinned where the journeys of the
other domain tests leave them free: which event types the flows take, that each kind's
table is its own, and where an intervention that upholds the buyer leads from the steps
whose approval does not lead to a refund (found by mutation testing of flows.py)."""

from __future__ import annotations

from domain_support import Driver, cst

from shared.domain.flows import FLOWS, all_event_types
from shared.domain.model import Kind

OPENED = cst(2026, 11, 2, 10)  # a Monday, far from holidays


def test_the_event_types_are_the_contracts_and_the_two_the_flows_added() -> None:
    # contract.md's v1 types, plus buyer.received (the buyer signs for a replacement,
    # issue 14) and merchant.refused_repair (seed 004); merchant.inspected once, not as
    # its .passed / .failed table keys.
    contract_v1 = {
        "case.opened", "merchant.approved", "merchant.rejected", "buyer.shipped",
        "merchant.received", "merchant.inspected", "merchant.reshipped", "buyer.confirmed",
        "buyer.cancelled", "buyer.modified", "repair.scheduled", "repair.visited",
        "repair.completed", "intervention.requested", "intervention.resolved",
        "refund.completed", "deadline.changed", "voucher.expired",
    }
    types = all_event_types()
    assert types == sorted(contract_v1 | {"buyer.received", "merchant.refused_repair"})


def test_each_kinds_flow_is_the_flow_of_that_kind() -> None:
    assert set(FLOWS) == set(Kind)
    for kind, flow in FLOWS.items():
        assert flow.kind is kind
    assert FLOWS[Kind.voucher_refund].opened_by == {
        "case.opened": "refund_request", "voucher.expired": "expiry_refund"}


def test_exchange_buyer_upheld_at_inspection_means_the_merchant_reships(
    driver: Driver,
) -> None:
    # The exchange's inspection approved leads to the replacement, not to a refund.
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12), carrier="SF", tracking_no="SF1")
    driver.send("merchant.received", cst(2026, 11, 5, 9))
    assert driver.step == "merchant_inspection"
    driver.send("intervention.requested", cst(2026, 11, 5, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="buyer")
    assert driver.step == "merchant_reship"


def test_exchange_failed_inspection_then_buyer_upheld_means_the_merchant_reships(
    driver: Driver,
) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    driver.send("buyer.shipped", cst(2026, 11, 3, 12), carrier="SF", tracking_no="SF1")
    driver.send("merchant.received", cst(2026, 11, 5, 8))
    driver.send("merchant.inspected", cst(2026, 11, 5, 9), passed=False)
    assert driver.step == "buyer_after_rejection"
    driver.send("intervention.requested", cst(2026, 11, 5, 10))
    driver.send("intervention.resolved", cst(2026, 11, 6, 10), outcome="buyer")
    assert driver.step == "merchant_reship"


def test_onsite_buyer_upheld_before_a_visit_time_obliges_the_merchant_to_visit(
    driver: Driver,
) -> None:
    # seed 004: without an agreed time the merchant must visit within 15 days.
    driver.open("onsite_repair", OPENED)
    assert driver.step == "visit_agreement"
    driver.send("intervention.requested", cst(2026, 11, 3, 10))
    driver.send("intervention.resolved", cst(2026, 11, 4, 10), outcome="buyer")
    assert driver.step == "visit_window"
    assert driver.due_local() == cst(2026, 11, 19, 10)  # 15 days from the resolution


def test_onsite_rejection_then_buyer_upheld_obliges_the_merchant_to_visit(
    driver: Driver,
) -> None:
    driver.open("onsite_repair", OPENED)
    driver.send("merchant.rejected", cst(2026, 11, 3, 10), reason="no defect",
                evidence=["https://x/1"])
    driver.send("intervention.requested", cst(2026, 11, 4, 10))
    driver.send("intervention.resolved", cst(2026, 11, 5, 10), outcome="buyer")
    assert driver.step == "visit_window"


def test_where_the_buyer_upheld_leads_from_every_step() -> None:
    # A refund unless the step's approval leads elsewhere (the exchange's replacement,
    # the repair legs, the on-site visit).
    upheld = {(kind.value, name): step.upheld_to
              for kind, flow in FLOWS.items() for name, step in flow.steps.items()
              if step.upheld_to != "refund_pending"}
    assert upheld == {
        ("return_refund", "merchant_response"): "buyer_return_shipping",
        ("exchange", "merchant_response"): "buyer_return_shipping",
        ("exchange", "merchant_inspection"): "merchant_reship",
        ("repair", "merchant_response"): "buyer_return_shipping",
        ("onsite_repair", "visit_agreement"): "visit_window",
    }
