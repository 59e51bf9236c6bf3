"""The traffic generator: realistic after-sales events as upstream systems send them.

Each case is a small scripted journey for its kind (exchange, refund only, return & refund,
repair, on-site repair, voucher refund): the buyer opens it, the merchant approves, rejects
or stays silent, the buyer ships (on time or late), asks the platform to intervene,
modifies or cancels, and so on. Many journeys are interleaved and their events emitted at
one total rate, stamped `occurred_at = now`. A share of messages are exact duplicates (the
same bytes, the same `event_id`, sent again) and a share are malformed (not JSON, missing
fields, unknown type, not UTF-8, bad data) so that intake's dedup and rejection paths run
too.

Deadlines: the rule sets' durations are hours and days. `--deadline-seconds N` puts the
platform's own deadline `due_at = now + N s` on every event that starts a timed step, so
a demo sees merchants' and buyers' missed deadlines turn into automatic decisions within
a minute. Without it, parties who are "late" simply stay silent: their cases wait for the
rule's deadline.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from heapq import heappop, heappush
from typing import Any

KINDS = ("refund_only", "return_refund", "exchange", "repair", "onsite_repair",
         "voucher_refund")
DEFAULT_MIX = {"refund_only": 30, "return_refund": 25, "exchange": 15, "repair": 8,
               "onsite_repair": 7, "voucher_refund": 15}
DEFAULT_PLATFORMS = ("kuaishou", "douyin", "taobao")
INTERVENTION_OUTCOMES = (("resume", 3), ("buyer", 4), ("merchant", 2), ("refund", 1))
MALFORMED_KINDS = ("invalid_json", "missing_field", "unknown_type", "not_utf8", "bad_data")
REASONS = ("尺码不合适", "商品有瑕疵", "与描述不符", "不想要了", "发错货", "质量问题")
CARRIERS = ("SF", "YTO", "ZTO", "STO", "YUNDA", "JD")


# ---- configuration ------------------------------------------------------------------------


@dataclass
class SimConfig:
    rate: float = 50.0  # messages per second (all categories); 0 = as fast as possible
    duration: float | None = 60.0  # seconds; None = until `count`
    count: int | None = None  # stop after this many messages
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    late_merchant_share: float = 0.15
    late_buyer_share: float = 0.10
    duplicate_share: float = 0.02
    malformed_share: float = 0.01
    intervention_share: float = 0.05
    rejection_share: float = 0.10
    cancel_share: float = 0.03
    deadline_seconds: float | None = None
    # On-time parties act within this many seconds (bounded by half the deadline).
    think_seconds: float = 2.0
    shops: int = 200
    run_id: str = ""


def parse_mix(text: str) -> dict[str, float]:
    """`exchange=2,refund_only=5` -> weights; kinds not named get weight 0."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"unknown kind {name!r} in --mix (kinds: {', '.join(KINDS)})")
        mix[name] = float(weight) if sep else 1.0
        if mix[name] < 0:
            raise ValueError(f"negative weight for {name} in --mix")
    if not any(mix.values()):
        raise ValueError("--mix gives no kind a positive weight")
    return mix


# ---- what is emitted -----------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    body: bytes
    routing_key: str
    category: str  # "event" | "duplicate" | "malformed"
    event: dict[str, Any] | None = None  # the well-formed event (event and duplicate)
    late: bool = False  # deliberately late: expected to be recorded as out_of_state
    malformed: str | None = None  # which kind of malformed message


@dataclass
class Summary:
    sent: int = 0
    events: int = 0
    duplicates: int = 0
    malformed: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    malformed_by_kind: Counter[str] = field(default_factory=Counter)
    cases_by_kind: Counter[str] = field(default_factory=Counter)
    cases_by_platform: Counter[str] = field(default_factory=Counter)
    journeys: Counter[str] = field(default_factory=Counter)  # late_merchant, rejection, ...
    late_events: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    elapsed: float = 0.0

    def count(self, msg: Message) -> None:
        self.sent += 1
        if msg.category == "event":
            self.events += 1
            assert msg.event is not None
            self.by_type[msg.event["type"]] += 1
            self.late_events += msg.late
        elif msg.category == "duplicate":
            self.duplicates += 1
        else:
            self.malformed += 1
            self.malformed_by_kind[msg.malformed or "?"] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "events": self.events,  # unique well-formed events: what intake records
            "duplicates": self.duplicates,
            "malformed": self.malformed,  # what lands in aftersales.events.rejected
            "late_events": self.late_events,
            "events_by_type": dict(sorted(self.by_type.items())),
            "malformed_by_kind": dict(sorted(self.malformed_by_kind.items())),
            "cases_by_kind": dict(sorted(self.cases_by_kind.items())),
            "cases_by_platform": dict(sorted(self.cases_by_platform.items())),
            "journeys": dict(sorted(self.journeys.items())),
            "confirmed": self.confirmed,
            "nacked": self.nacked,
            "returned": self.returned,
            "elapsed_s": round(self.elapsed, 3),
            "rate": round(self.sent / self.elapsed, 1) if self.elapsed > 0 else None,
        }


# ---- journeys --------------------------------------------------------------------------------


@dataclass
class Beat:
    """One event of a journey, emitted `delay` seconds after the previous one."""

    type: str
    delay: float
    data: dict[str, Any] = field(default_factory=dict)
    due: bool = False  # carries the platform deadline (deadline mode) for the step it starts
    late: bool = False  # deliberately after the deadline: the case has moved on
    visit_in: float | None = None  # repair.scheduled: visit_at = emission time + this


@dataclass
class Journey:
    case_id: str
    order_id: str
    shop_id: str
    platform: str
    kind: str
    beats: list[Beat]
    position: int = 0
    seq: int = 0


class TrafficGenerator:
    """Interleaved journeys -> a stream of messages. Pure apart from its random generator:
    the caller passes the time (`t` seconds since start, `wall` the matching clock time),
    so the same seed and times give the same messages."""

    def __init__(self, config: SimConfig, rng: random.Random | None = None) -> None:
        self.cfg = config
        self.rng = rng or random.Random()
        self.run_id = config.run_id or f"{int(time.time()):x}{self.rng.randrange(16**4):04x}"
        self.summary = Summary()
        self._ready: list[tuple[float, int, Journey]] = []  # (ready at t, tiebreak, journey)
        self._tiebreak = 0
        self._cases = 0
        self._recent: deque[Message] = deque(maxlen=2000)
        kinds = [k for k in KINDS if config.mix.get(k, 0) > 0]
        self._kinds = kinds
        self._kind_weights = [config.mix[k] for k in kinds]
        d = config.deadline_seconds
        self._think = min(config.think_seconds, 0.5 * d) if d else config.think_seconds
        # a late party acts this long after the deadline it missed was set
        self._late_after = (1.5 * d + 1.0) if d else None

    # -- the stream

    def next(self, t: float, wall: datetime) -> Message:
        rng, cfg = self.rng, self.cfg
        roll = rng.random()
        if roll < cfg.malformed_share:
            msg = self._malformed(wall)
        elif roll < cfg.malformed_share + cfg.duplicate_share and self._recent:
            original = rng.choice(self._recent)
            msg = Message(original.body, original.routing_key, "duplicate", original.event)
        else:
            msg = self._next_event(t, wall)
            self._recent.append(msg)
        self.summary.count(msg)
        return msg

    def _next_event(self, t: float, wall: datetime) -> Message:
        while self._ready and self._ready[0][0] <= t:
            _at, _tb, journey = heappop(self._ready)
            if journey.position < len(journey.beats):
                return self._emit(journey, t, wall)
        return self._emit(self._open_journey(), t, wall)

    def _emit(self, journey: Journey, t: float, wall: datetime) -> Message:
        beat = journey.beats[journey.position]
        journey.position += 1
        journey.seq += 1
        data = dict(beat.data)
        if beat.visit_in is not None:
            data["visit_at"] = (wall + timedelta(seconds=beat.visit_in)).isoformat()
        event: dict[str, Any] = {
            "event_id": f"sim-{self.run_id}-{journey.case_id[-8:]}-{journey.seq}",
            "type": beat.type,
            "occurred_at": wall.isoformat(),
            "platform": journey.platform,
            "shop_id": journey.shop_id,
            "order_id": journey.order_id,
            "case_id": journey.case_id,
            "data": data,
        }
        if beat.due and self.cfg.deadline_seconds:
            event["due_at"] = (wall + timedelta(seconds=self.cfg.deadline_seconds)).isoformat()
        if journey.position < len(journey.beats):
            self._tiebreak += 1
            nxt = journey.beats[journey.position]
            heappush(self._ready, (t + nxt.delay, self._tiebreak, journey))
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        return Message(body, beat.type, "event", event, late=beat.late)

    # -- building a journey

    def _open_journey(self) -> Journey:
        rng, cfg = self.rng, self.cfg
        self._cases += 1
        n = self._cases
        kind = rng.choices(self._kinds, self._kind_weights)[0]
        platform = rng.choice(cfg.platforms)
        shop = rng.randrange(cfg.shops)
        journey = Journey(
            case_id=f"AS-{self.run_id}-{n:08d}", order_id=f"O-{self.run_id}-{n:08d}",
            shop_id=f"S{1000 + shop}", platform=platform, kind=kind, beats=[],
        )
        journey.beats = self._script(kind, shop)
        self.summary.cases_by_kind[kind] += 1
        self.summary.cases_by_platform[platform] += 1
        return journey

    def _ontime(self) -> float:
        return self.rng.uniform(0.1, 1.0) * self._think

    def _script(self, kind: str, shop: int) -> list[Beat]:
        rng, cfg = self.rng, self.cfg
        amount = rng.choice((990, 1990, 4590, 12900, 29900, 59900, 129900))
        phone = f"13{rng.randrange(10**9):09d}"
        opened: dict[str, Any] = {
            "kind": kind, "amount_fen": amount, "reason": rng.choice(REASONS),
            "evidence": [f"https://img.example.com/{self.run_id}/{self._cases}.jpg"],
            "buyer": {"phone": phone, "email": f"buyer{phone}@example.com"},
            "merchant": {"phone": f"139{1000_0000 + shop:08d}",
                         "email": f"shop{1000 + shop}@example.com"},
        }
        if kind == "voucher_refund":
            return self._voucher(opened, amount)
        late_merchant = rng.random() < cfg.late_merchant_share
        late_buyer = rng.random() < cfg.late_buyer_share
        beats = [Beat("case.opened", 0.0, opened, due=True)]
        path = rng.random()
        if rng.random() < cfg.cancel_share:
            self.summary.journeys["cancelled"] += 1
            return [*beats, Beat("buyer.cancelled", self._ontime(), {"reason": "不想要了"})]
        if late_merchant:
            self.summary.journeys["late_merchant"] += 1
            if self._late_after is None:
                return beats  # silent; the case waits for the rule's deadline
            # silent: the deadline fires (auto-approve / require visit), then the flow goes on
            rest = self._after_approval(kind, amount, late_buyer, by_timeout=True)
            if rest:
                rest[0].delay = self._late_after
            return beats + rest
        if path < cfg.intervention_share:
            self.summary.journeys["intervention"] += 1
            beats.append(Beat("intervention.requested", self._ontime(),
                              {"requested_by": "buyer", "reason": "商家未处理"}))
            outcome = rng.choices([o for o, _ in INTERVENTION_OUTCOMES],
                                  [w for _, w in INTERVENTION_OUTCOMES])[0]
            beats.append(Beat("intervention.resolved", self._ontime(), {"outcome": outcome},
                              due=outcome != "merchant"))
            self.summary.journeys[f"intervention_{outcome}"] += 1
            if outcome == "merchant":
                return beats
            if outcome == "refund":
                return [*beats, Beat("refund.completed", self._ontime(), {"amount_fen": amount})]
            if outcome == "resume":
                return beats + self._approval(kind, amount, late_buyer)
            return beats + self._after_approval(kind, amount, late_buyer, by_timeout=True)
        if path < cfg.intervention_share + cfg.rejection_share:
            self.summary.journeys["rejection"] += 1
            beats.append(Beat("merchant.rejected", self._ontime(),
                              {"reason": "商品已使用,影响二次销售",
                               "evidence": ["https://img.example.com/reject.jpg"]}, due=True))
            if late_buyer:
                self.summary.journeys["late_buyer"] += 1
                return beats  # silent: auto-close at the deadline
            choice = rng.random()
            if choice < 0.5:
                beats.append(Beat("buyer.modified", self._ontime(),
                                  {"reason": "补充凭证", "evidence": ["https://img.example.com/m.jpg"]},
                                  due=True))
                return beats + self._approval(kind, amount, False)
            if choice < 0.8:
                beats.append(Beat("intervention.requested", self._ontime(),
                                  {"requested_by": "buyer", "reason": "商家拒绝"}))
                beats.append(Beat("intervention.resolved", self._ontime(), {"outcome": "buyer"},
                                  due=True))
                self.summary.journeys["intervention_buyer"] += 1
                return beats + self._after_approval(kind, amount, False, by_timeout=True)
            return [*beats, Beat("buyer.cancelled", self._ontime(), {"reason": "放弃售后"})]
        return beats + self._approval(kind, amount, late_buyer)

    def _approval(self, kind: str, amount: int, late_buyer: bool) -> list[Beat]:
        """The merchant acts on time at the first step, then the rest of the flow."""
        if kind == "onsite_repair":
            first = Beat("repair.scheduled", self._ontime(), {}, due=True,
                         visit_in=self._visit_lead())
            return [first, *self._after_approval(kind, amount, late_buyer, by_timeout=False)]
        return [Beat("merchant.approved", self._ontime(), {}, due=True),
                *self._after_approval(kind, amount, late_buyer, by_timeout=False)]

    def _visit_lead(self) -> float:
        d = self.cfg.deadline_seconds
        return 0.8 * d if d else 86400.0

    def _after_approval(self, kind: str, amount: int, late_buyer: bool,
                        by_timeout: bool) -> list[Beat]:
        """From the step the approval leads to. `by_timeout`: that step was entered by a
        timeout or an intervention, not an event of ours, so the first beat here is the
        first one that the simulator sends after it."""
        rng = self.rng
        t = self._ontime
        if kind == "refund_only":
            return [Beat("refund.completed", t(), {"amount_fen": amount})]
        if kind == "onsite_repair":
            if by_timeout:  # visit window (or scheduled after the buyer was upheld)
                return [Beat("repair.visited", t(), {}, due=True),
                        Beat("repair.completed", t(), {})]
            return [Beat("repair.visited", t(), {}, due=True),
                    *([Beat("repair.visited", t(), {})] if rng.random() < 0.2 else []),
                    Beat("repair.completed", t(), {})]
        beats: list[Beat] = []
        shipped = Beat("buyer.shipped", t(), {"carrier": rng.choice(CARRIERS),
                                             "tracking_no": f"T{rng.randrange(10**12):012d}"},
                       due=True)
        # Late with the return only where our own event set the shipping deadline (after a
        # timeout the rule's days-long deadline applies and the buyer cannot be late).
        late_ship = late_buyer and not by_timeout and (kind == "return_refund"
                                                       or rng.random() < 0.5)
        if late_ship:
            self.summary.journeys["late_buyer"] += 1
            if self._late_after is None:
                return []  # silent: the case waits for the rule's deadline
            shipped.delay = self._late_after
            shipped.late = True  # the request auto-closed meanwhile: out_of_state
            return [shipped]
        late_confirm = late_buyer and kind != "return_refund"  # the buyer does not confirm
        beats.append(shipped)
        beats.append(Beat("merchant.received", t(), {}, due=True))
        if kind == "return_refund":
            beats.append(Beat("merchant.inspected", t(), {"passed": True}, due=True))
            beats.append(Beat("refund.completed", t(), {"amount_fen": amount}))
            return beats
        if kind == "repair":
            if rng.random() < 0.1:
                self.summary.journeys["refused_repair"] += 1
                beats.append(Beat("merchant.refused_repair", t(), {"reason": "无法维修"}))
                beats.append(Beat("refund.completed", t(), {"amount_fen": amount}))
                return beats
            beats.append(self._reshipped())
        else:  # exchange
            beats.append(Beat("merchant.inspected", t(), {"passed": True}, due=True))
            beats.append(self._reshipped())
        # the buyer signs for the replacement / repaired item: the 10 days to confirm start
        beats.append(Beat("buyer.received", t(), {}, due=True))
        if late_confirm:
            self.summary.journeys["late_buyer"] += 1
            return beats  # silent: auto-confirm at the deadline
        beats.append(Beat("buyer.confirmed", t(), {}))
        return beats

    def _reshipped(self) -> Beat:
        rng = self.rng
        return Beat("merchant.reshipped", self._ontime(),
                    {"carrier": rng.choice(CARRIERS),
                     "tracking_no": f"R{rng.randrange(10**12):012d}"}, due=True)

    def _voucher(self, opened: dict[str, Any], amount: int) -> list[Beat]:
        rng = self.rng
        total = rng.choice((1, 2, 3, 5, 10))
        roll = rng.random()
        if roll < 0.25:  # expired unused: voucher.expired opens the case
            self.summary.journeys["voucher_expired"] += 1
            data = {k: v for k, v in opened.items() if k != "reason"}
            data.update(voucher_total_count=total, voucher_used_count=0)
            return [Beat("voucher.expired", 0.0, data, due=True),
                    Beat("refund.completed", self._ontime(), {"amount_fen": amount})]
        used = 0 if roll < 0.7 or total == 1 else rng.randrange(1, total)
        self.summary.journeys["voucher_partly_used" if used else "voucher_unused"] += 1
        data = {**opened, "voucher_total_count": total, "voucher_used_count": used}
        refund = amount * (total - used) // total  # floored to the fen (seed 004)
        # no due_at: the refund request is an immediate rule (approved at once)
        return [Beat("case.opened", 0.0, data),
                Beat("refund.completed", self._ontime(), {"amount_fen": refund})]

    # -- malformed messages

    def _malformed(self, wall: datetime) -> Message:
        rng = self.rng
        which = rng.choice(MALFORMED_KINDS)
        n = rng.randrange(10**9)
        base: dict[str, Any] = {
            "event_id": f"sim-{self.run_id}-bad-{n}", "type": "case.opened",
            "occurred_at": wall.isoformat(), "platform": rng.choice(self.cfg.platforms),
            "shop_id": "S1000", "order_id": f"O-bad-{n}", "case_id": f"AS-bad-{n}",
            "data": {"kind": "refund_only", "amount_fen": 100},
        }
        key = "case.opened"
        if which == "invalid_json":
            body = json.dumps(base).encode()[:-17]
            key = "unknown"
        elif which == "missing_field":
            del base["case_id"]
            body = json.dumps(base).encode()
        elif which == "unknown_type":
            base["type"] = key = "case.exploded"
            body = json.dumps(base).encode()
        elif which == "not_utf8":
            body = json.dumps(base, ensure_ascii=False).replace(
                "refund_only", "退款").encode("gb18030")
            body = b'{"reason":"\xcd\xcb\xbf\xee",' + body[1:]
        else:  # bad_data: a negative amount
            base["data"]["amount_fen"] = -5
            body = json.dumps(base).encode()
        return Message(body, key, "malformed", malformed=which)


def generate(config: SimConfig, n: int, seed: int | None = None,
             start: datetime | None = None, rate: float | None = None) -> Iterator[Message]:
    """`n` messages on a virtual clock at `rate` per second (default the config's), for
    pre-generating traffic (benchmarks, tests, --dry-run)."""
    gen = TrafficGenerator(config, random.Random(seed))
    start = start or datetime.now(UTC)
    step = 1.0 / (rate or config.rate or 1000.0)
    for i in range(n):
        t = i * step
        yield gen.next(t, start + timedelta(seconds=t))


class PacedFeed:
    """Turns the generator into `feed(n)` for the publisher: at most `rate` messages per
    second since the start (0 = no limit), until `duration` seconds or `count` messages."""

    def __init__(self, gen: TrafficGenerator, rate: float, duration: float | None,
                 count: int | None) -> None:
        self.gen = gen
        self.rate = rate
        self.duration = duration
        self.count = count
        self.start_mono = time.monotonic()
        self.start_wall = datetime.now(UTC)
        self.sent = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start_mono

    def __call__(self, n: int) -> list[Message] | None:
        t = self.elapsed()
        if (self.duration is not None and t >= self.duration) or \
                (self.count is not None and self.sent >= self.count):
            return None
        allowed = n
        if self.rate > 0:
            allowed = min(n, int(t * self.rate) + 1 - self.sent)
        if self.count is not None:
            allowed = min(allowed, self.count - self.sent)
        out = []
        for _ in range(max(0, allowed)):
            wall = datetime.now(UTC)
            out.append(self.gen.next(t, wall))
        self.sent += len(out)
        return out
