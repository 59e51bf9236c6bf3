"""The after-sales flows as data: for each kind, its steps, who must act in each, which
event moves the case where, and which timeout actions a rule may choose for the step.

Events that work the same in every flow (buyer.cancelled, intervention.requested,
intervention.resolved, deadline.changed) are handled by the engine, not listed here.

The flow tables are built on first use (`flow_tables()`, cached), not when the module is
imported: the tables never change in a process, and building them late lets mutation
testing switch the code that builds them (docs/design.md, "Mutation testing").
`FLOWS` reads through `flow_tables()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache

from shared.domain.model import Kind, Party


@dataclass(frozen=True)
class Go:
    """Enter `step` (re-entering the current step restarts its clock)."""

    step: str


@dataclass(frozen=True)
class Close:
    resolution: str


@dataclass(frozen=True)
class Stay:
    """Record the event's facts; the step and its clock stay as they are."""


Target = Go | Close | Stay

# Steps every kind shares.
INTERVENTION = "intervention"  # the platform decides; the interrupted step's clock is paused
CLOSED_STEP = "closed"
REFUND_PENDING = "refund_pending"
AFTER_REJECTION = "buyer_after_rejection"

# Timeout action -> the decision type it publishes.
DECISION_OF_ACTION: Mapping[str, str] = {
    "auto_approve": "decision.auto_approved",
    "auto_close": "decision.auto_closed",
    "auto_refund": "decision.auto_refunded",
    "auto_confirm": "decision.auto_confirmed",
    "escalate": "decision.escalated",
    # onsite repair: no visit time agreed in 3 days -> the merchant must visit within 15
    # days. Not a transfer to the platform: not escalated, ops are not paged (seed 004).
    "require_visit": "decision.visit_required",
    # the carrier never reported the buyer's sign-off for the replacement: deemed received
    "deem_received": "decision.deemed_received",
}
REMIND = "remind"  # the action of reminder deadlines
ESCALATE = "escalate"  # allowed in every timed step: hands the case to the platform (intervention)


@dataclass(frozen=True)
class StepDef:
    party: Party  # who must act
    description: str
    on: Mapping[str, Target] = field(default_factory=dict)  # event key -> target
    timeout: Mapping[str, Target] = field(default_factory=dict)  # allowed action -> target
    # where the case goes when an intervention upholds the buyer at this step
    upheld_to: str = REFUND_PENDING

    @property
    def allowed_actions(self) -> frozenset[str]:
        return frozenset(self.timeout) | {ESCALATE}


@dataclass(frozen=True)
class FlowDef:
    kind: Kind
    steps: Mapping[str, StepDef]
    opened_by: Mapping[str, str]  # opening event type -> first step

    @property
    def first_step(self) -> str:
        return self.opened_by["case.opened"]

    def defines(self, step: str) -> bool:
        return step in self.steps or step in (INTERVENTION, CLOSED_STEP)


REFUNDED = Close("refunded")
TO_REFUND = Go(REFUND_PENDING)


def _refund_pending() -> StepDef:
    return StepDef(
        Party.platform,
        "the approved refund is being paid (money back within 7 working days, seed 004)",
        on={"refund.completed": REFUNDED},
    )


def _after_rejection(first_step: str) -> StepDef:
    # seed 004: 审核不通过的消费者可修改/取消/申请介入 (cancel and intervention are global)
    return StepDef(
        Party.buyer,
        "after a rejection the buyer modifies, cancels or asks the platform to intervene",
        on={"buyer.modified": Go(first_step)},
        timeout={"auto_close": Close("auto_closed")},
    )


def _merchant_response(approved_to: str, extra: Mapping[str, Target] | None = None) -> StepDef:
    return StepDef(
        Party.merchant,
        "the merchant approves or rejects the request",
        on={
            "merchant.approved": Go(approved_to),
            "merchant.rejected": Go(AFTER_REJECTION),
            "buyer.modified": Go("merchant_response"),
            **(extra or {}),
        },
        timeout={"auto_approve": Go(approved_to), "auto_refund": TO_REFUND},
        upheld_to=approved_to,
    )


def _return_leg(received_to: str) -> dict[str, StepDef]:
    """The buyer sends the item back and the merchant signs for it."""
    return {
        "buyer_return_shipping": StepDef(
            Party.buyer,
            "the buyer ships the item back and uploads the waybill",
            on={"buyer.shipped": Go("return_in_transit")},
            timeout={"auto_close": Close("auto_closed")},
        ),
        "return_in_transit": StepDef(
            Party.merchant,
            "the returned item travels; the merchant signs for it",
            on={"merchant.received": Go(received_to)},
        ),
    }


def _replacement_in_transit() -> StepDef:
    # seed 004: the buyer's 10 days to confirm count from signing for the replacement
    # (签收换货后), not from the merchant's shipment; buyer.received is that sign-off. If it
    # never comes, the rule's deadline deems the item received and the 10 days start then.
    return StepDef(
        Party.buyer,
        "the replacement / repaired item travels; the buyer signs for it",
        on={"buyer.received": Go("buyer_confirm"), "buyer.confirmed": Close("completed")},
        timeout={"deem_received": Go("buyer_confirm")},
    )


def _buyer_confirm() -> StepDef:
    return StepDef(
        Party.buyer,
        "the buyer confirms receipt of the replacement / repaired item",
        on={"buyer.confirmed": Close("completed")},
        timeout={"auto_confirm": Close("completed")},
    )


def _repair_refused() -> StepDef:
    # seed 004: 商户无故拒绝提供维修服务,快手小店将支持消费者退货退款 (an immediate rule)
    return StepDef(
        Party.platform,
        "the merchant refused to repair: the platform supports return & refund",
        on={"refund.completed": REFUNDED},
        timeout={"auto_refund": TO_REFUND},
    )


REFUSED = Go("repair_refused")


def _build_flows() -> dict[Kind, FlowDef]:
    return {
        Kind.refund_only: FlowDef(
            Kind.refund_only,
            {
                "merchant_response": _merchant_response(
                    REFUND_PENDING, {"refund.completed": REFUNDED}
                ),
                AFTER_REJECTION: _after_rejection("merchant_response"),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "merchant_response"},
        ),
        Kind.return_refund: FlowDef(
            Kind.return_refund,
            {
                "merchant_response": _merchant_response("buyer_return_shipping"),
                **_return_leg("merchant_inspection"),
                "merchant_inspection": StepDef(
                    Party.merchant,
                    "the merchant confirms receipt, inspects and refunds",
                    on={
                        "merchant.inspected.passed": TO_REFUND,
                        "merchant.inspected.failed": Go(AFTER_REJECTION),
                        "merchant.approved": TO_REFUND,
                        "merchant.rejected": Go(AFTER_REJECTION),
                        "refund.completed": REFUNDED,
                    },
                    timeout={"auto_refund": TO_REFUND},
                ),
                AFTER_REJECTION: _after_rejection("merchant_response"),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "merchant_response"},
        ),
        Kind.exchange: FlowDef(
            Kind.exchange,
            {
                "merchant_response": _merchant_response("buyer_return_shipping"),
                **_return_leg("merchant_inspection"),
                "merchant_inspection": StepDef(
                    Party.merchant,
                    "the merchant unpacks and inspects the returned item",
                    on={
                        "merchant.inspected.passed": Go("merchant_reship"),
                        "merchant.inspected.failed": Go(AFTER_REJECTION),
                        "merchant.rejected": Go(AFTER_REJECTION),
                        "merchant.reshipped": Go("replacement_in_transit"),
                    },
                    # default: inspection deemed passed, the merchant must re-ship
                    timeout={"auto_approve": Go("merchant_reship")},
                    upheld_to="merchant_reship",
                ),
                "merchant_reship": StepDef(
                    Party.merchant,
                    "the merchant ships the replacement",
                    on={"merchant.reshipped": Go("replacement_in_transit")},
                ),
                "replacement_in_transit": _replacement_in_transit(),
                "buyer_confirm": _buyer_confirm(),
                AFTER_REJECTION: _after_rejection("merchant_response"),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "merchant_response"},
        ),
        Kind.repair: FlowDef(
            Kind.repair,
            {
                "merchant_response": _merchant_response(
                    "buyer_return_shipping", {"merchant.refused_repair": REFUSED}
                ),
                **_return_leg("merchant_repair"),
                "merchant_repair": StepDef(
                    Party.merchant,
                    "the merchant repairs the item and sends it back",
                    on={"merchant.reshipped": Go("replacement_in_transit"),
                        "merchant.refused_repair": REFUSED},
                    timeout={"auto_refund": TO_REFUND},
                ),
                "repair_refused": _repair_refused(),
                "replacement_in_transit": _replacement_in_transit(),
                "buyer_confirm": _buyer_confirm(),
                AFTER_REJECTION: _after_rejection("merchant_response"),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "merchant_response"},
        ),
        Kind.onsite_repair: FlowDef(
            Kind.onsite_repair,
            {
                "visit_agreement": StepDef(
                    Party.merchant,
                    "merchant and buyer agree on a visit time",
                    on={
                        "repair.scheduled": Go("visit_scheduled"),
                        "merchant.rejected": Go(AFTER_REJECTION),
                        "merchant.refused_repair": REFUSED,
                        "buyer.modified": Go("visit_agreement"),
                    },
                    timeout={"require_visit": Go("visit_window"), "auto_refund": TO_REFUND},
                    upheld_to="visit_window",
                ),
                "visit_window": StepDef(
                    Party.merchant,
                    "no time agreed: the merchant must visit within the window",
                    on={
                        "repair.scheduled": Go("visit_scheduled"),
                        "repair.visited": Go("repair_in_progress"),
                        "merchant.refused_repair": REFUSED,
                    },
                    timeout={"auto_refund": TO_REFUND},
                ),
                "visit_scheduled": StepDef(
                    Party.merchant,
                    "the merchant visits at the agreed time",
                    on={
                        "repair.visited": Go("repair_in_progress"),
                        "repair.scheduled": Go("visit_scheduled"),  # rescheduled
                        "merchant.refused_repair": REFUSED,
                    },
                    timeout={"auto_refund": TO_REFUND},
                ),
                "repair_in_progress": StepDef(
                    Party.merchant,
                    "the merchant finishes the repair (counted from the first visit)",
                    on={
                        "repair.completed": Close("completed"),
                        "repair.visited": Stay(),  # later visits do not move the deadline
                        "merchant.refused_repair": REFUSED,
                    },
                    timeout={"auto_refund": TO_REFUND},
                ),
                "repair_refused": _repair_refused(),
                AFTER_REJECTION: _after_rejection("visit_agreement"),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "visit_agreement"},
        ),
        Kind.voucher_refund: FlowDef(
            Kind.voucher_refund,
            {
                "refund_request": StepDef(
                    Party.platform,
                    "an unused (or partly used) voucher: the system approves at once",
                    on={"refund.completed": REFUNDED},
                    timeout={"auto_approve": TO_REFUND},
                ),
                "expiry_refund": StepDef(
                    Party.platform,
                    "an expired unused voucher: the system initiates the refund",
                    on={"refund.completed": REFUNDED},
                    timeout={"auto_refund": TO_REFUND},
                ),
                REFUND_PENDING: _refund_pending(),
            },
            {"case.opened": "refund_request", "voucher.expired": "expiry_refund"},
        ),
    }


@cache
def flow_tables() -> Mapping[Kind, FlowDef]:
    """Every kind's flow, built once per process on first use."""
    return _build_flows()


@cache
def opening_events() -> frozenset[str]:
    """Event types that open a case (of some kind)."""
    return frozenset(t for flow in flow_tables().values() for t in flow.opened_by)


def forget_built_tables() -> None:
    """Build the tables afresh on their next use. Nothing needs this in production (the
    tables never change); the domain tests call it before each test so that a mutant of
    the code building them takes effect in a test process forked from one that built them
    already (mutation testing) and that every test using them is counted as testing it."""
    flow_tables.cache_clear()
    opening_events.cache_clear()


class _FlowsByKind(Mapping[Kind, FlowDef]):
    """A read-only view of `flow_tables()`: the tables are built on first access."""

    def __getitem__(self, kind: Kind) -> FlowDef:
        return flow_tables()[kind]

    def __iter__(self) -> Iterator[Kind]:
        return iter(flow_tables())

    def __len__(self) -> int:
        return len(flow_tables())


FLOWS: Mapping[Kind, FlowDef] = _FlowsByKind()

# Events the engine handles the same way for every kind.
GLOBAL_EVENTS = ("buyer.cancelled", "intervention.requested", "intervention.resolved",
                 "deadline.changed")

# Outcomes of intervention.resolved.
INTERVENTION_OUTCOMES: Mapping[str, str] = {
    "resume": "back to the interrupted step; its clock goes on with the time that was left",
    "buyer": "the buyer is upheld: the case goes where the interrupted (or rejected) step's "
    "approval leads",
    "merchant": "the merchant is upheld: the case closes (resolution merchant_upheld)",
    "refund": "the platform orders a refund: the case goes to refund_pending",
}

# Where buyer.cancelled is refused: the money is already on its way.
NOT_CANCELLABLE = frozenset({REFUND_PENDING})


# The intervention: the platform decides (see INTERVENTION_OUTCOMES); a refund the merchant
# makes meanwhile still closes the case. It has no deadline of its own.
INTERVENTION_STEP = StepDef(
    Party.platform,
    "the platform intervenes; the interrupted step's clock is paused",
    on={"refund.completed": REFUNDED},
)


def step_def(kind: Kind, step: str) -> StepDef | None:
    if step == INTERVENTION:
        return INTERVENTION_STEP
    return flow_tables()[kind].steps.get(step)


def timed_steps(kind: Kind) -> list[str]:
    """Steps that need a rule (a deadline); the intervention has none."""
    return list(flow_tables()[kind].steps)


def all_event_types() -> list[str]:
    keys = {
        key.removesuffix(".passed").removesuffix(".failed")
        for flow in flow_tables().values()
        for step in flow.steps.values()
        for key in step.on
    }
    return sorted(keys | opening_events() | set(GLOBAL_EVENTS))
