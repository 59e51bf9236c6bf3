"""Who is told what: expand a domain `Notice` into notification requests, and render them.

Pure: the only I/O is reading `policy.toml` and the templates once, in `NotificationPolicy.load`.
The policy is data (policy.toml beside the rule sets); this module only interprets it.

- `expand(notice, contacts, ops_contacts)` -> one `NotificationRequest` per
  (recipient, channel), each with a stable `dedup_key`. The key is what makes a notification
  exactly-once: it is the unique key of the notifications row, written before any send, and
  it travels to the provider (SMTP Message-ID, Aliyun OutId, Tencent SessionContext).
- `render(request)` -> `RenderedMessage`: subject and body for email (Jinja2, zh-CN), or the
  provider template codes plus template parameters for SMS (providers only send texts whose
  template they approved beforehand, so an SMS is never free text).
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from shared.domain.timeutil import CHINA_TZ_NAME

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_POLICY_FILE = PACKAGE_DIR / "policy.toml"
DEFAULT_TEMPLATES_DIR = PACKAGE_DIR / "templates"

CHANNELS = ("sms", "email")
PARTIES = ("merchant", "buyer", "ops")
# "concerned" = the party named on the notice (who must act, who is warned).
CONCERNED = "concerned"
# The domain names the platform as a party (e.g. waiting on a platform intervention); the
# people who watch the platform's side here are ops.
_PARTY_ALIASES = {"platform": "ops"}


class PolicyError(ValueError):
    """The policy data or a template is inconsistent (raised at load or at render)."""


# --------------------------------------------------------------------------------------
# Value objects
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsContacts:
    """Who ops are, from settings (AFTERSALES_OPS_EMAILS / AFTERSALES_OPS_PHONES)."""

    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    tz: str | None = None

    @classmethod
    def parse(
        cls, emails: str | Iterable[str] = (), phones: str | Iterable[str] = ()
    ) -> OpsContacts:
        """Accept comma/space separated strings (the env var form) or iterables."""
        return cls(emails=_split(emails), phones=_split(phones))


def _split(v: str | Iterable[str]) -> tuple[str, ...]:
    items = re.split(r"[,;\s]+", v) if isinstance(v, str) else list(v)
    return tuple(i.strip() for i in items if i and i.strip())


@dataclass(frozen=True)
class NotificationRequest:
    """One message to one address over one channel. JSON-safe via to_dict / from_dict."""

    dedup_key: str
    case_id: str
    reason: str
    party: str  # merchant | buyer | ops (the recipient's role)
    channel: str  # sms | email
    recipient: str  # the real address; mask it (masking.py) before it reaches a log line
    template: str
    params: Mapping[str, Any]
    urgent: bool
    step: str = ""
    due_at: str | None = None  # RFC 3339 of the deadline concerned, or None
    tz: str | None = None  # the recipient's time zone (quiet hours, local times in texts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dedup_key": self.dedup_key,
            "case_id": self.case_id,
            "reason": self.reason,
            "party": self.party,
            "channel": self.channel,
            "recipient": self.recipient,
            "template": self.template,
            "params": _json_safe(self.params),
            "urgent": self.urgent,
            "step": self.step,
            "due_at": self.due_at,
            "tz": self.tz,
        }

    @classmethod
    def from_row(cls, row: Any) -> NotificationRequest:
        """From a notifications row (any object with the columns as attributes).

        The row keeps step, due_at and tz inside `params` (expand puts them there).
        """
        params = dict(getattr(row, "params", None) or {})
        return cls(
            dedup_key=str(row.dedup_key),
            case_id=str(row.case_id),
            reason=str(row.reason),
            party=str(row.party),
            channel=str(row.channel),
            recipient=str(row.recipient),
            template=str(row.template),
            params=MappingProxyType(params),
            urgent=bool(row.urgent),
            step=str(params.get("step") or ""),
            due_at=params.get("due_at"),
            tz=params.get("tz"),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NotificationRequest:
        return cls(
            dedup_key=str(d["dedup_key"]),
            case_id=str(d["case_id"]),
            reason=str(d["reason"]),
            party=str(d["party"]),
            channel=str(d["channel"]),
            recipient=str(d["recipient"]),
            template=str(d["template"]),
            params=MappingProxyType(dict(d.get("params") or {})),
            urgent=bool(d.get("urgent", False)),
            step=str(d.get("step") or ""),
            due_at=d.get("due_at"),
            tz=d.get("tz"),
        )


@dataclass(frozen=True)
class RenderedMessage:
    """What a channel sends. Email: subject + body. SMS: template codes + parameters."""

    channel: str
    recipient: str
    template: str
    subject: str = ""
    body: str = ""  # email body; for SMS the text as approved with the provider, filled in
    # SMS: provider name -> template code (Aliyun "SMS_123…", Tencent TemplateId "123…").
    template_codes: Mapping[str, str] = field(default_factory=dict)
    # SMS: parameter name -> value, in the template's declared order (Tencent's
    # TemplateParamSet is positional, Aliyun's TemplateParam is by name).
    template_param: Mapping[str, str] = field(default_factory=dict)

    def template_code(self, provider: str) -> str:
        return self.template_codes.get(provider, "")


# --------------------------------------------------------------------------------------
# Dedup key
# --------------------------------------------------------------------------------------


def normalize_address(address: str, channel: str) -> str:
    """The same person written two ways must get the same key (and one message)."""
    a = address.strip()
    if channel == "email":
        return a.lower()
    digits = re.sub(r"[^\d+]", "", a)
    for cc in ("+86", "0086"):
        if digits.startswith(cc):
            return digits[len(cc) :]
    if digits.startswith("86") and len(digits) == 13:
        return digits[2:]
    return digits


def _deadline_text(due_at: datetime | str | None) -> str:
    if due_at is None or due_at == "":
        return "-"
    dt = _as_datetime(due_at)
    # UTC and second precision so "+08:00" vs "Z" spellings of one instant give one key.
    return dt.astimezone(UTC).replace(microsecond=0).isoformat()


def dedup_key(
    case_id: str, reason: str, due_at: datetime | str | None, recipient: str, channel: str
) -> str:
    """Stable key of (case, reason, deadline, recipient, channel).

    32 hex chars (128 bits of SHA-256): fits Aliyun's OutId, Tencent's SessionContext and a
    Message-ID local part, and does not reveal the address it was made from.
    """
    return _dedup_key(case_id, reason, _deadline_text(due_at), recipient, channel)


def _dedup_key(case_id: str, reason: str, deadline_text: str, recipient: str, channel: str
               ) -> str:
    address = normalize_address(recipient, channel)
    parts = [case_id, reason, deadline_text, address, channel]
    # \x1f (unit separator) cannot occur in any part, so distinct tuples never collide.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


# --------------------------------------------------------------------------------------
# Template helpers (Jinja2 filters)
# --------------------------------------------------------------------------------------


def _as_datetime(v: datetime | str) -> datetime:
    dt = v if isinstance(v, datetime) else datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise PolicyError(f"naive datetime {dt!r}: times must carry a zone")
    return dt


def yuan(fen: Any) -> str:
    """Integer fen -> yuan with 2 decimals: 1234 -> "12.34", -5 -> "-0.05".

    Integer arithmetic only: money is never a float anywhere in the project.
    """
    if fen is None or isinstance(fen, jinja2.Undefined) or fen == "":
        return "—"
    n = int(fen)
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n // 100}.{n % 100:02d}"


def local_time(v: Any, tz: str | None = None) -> str:
    """An instant as the recipient reads it: "11月24日 10:00" in their zone."""
    if v is None or isinstance(v, jinja2.Undefined) or v == "":
        return "—"
    if isinstance(v, date) and not isinstance(v, datetime):
        return f"{v.month}月{v.day}日"
    dt = _as_datetime(v).astimezone(ZoneInfo(tz or CHINA_TZ_NAME))
    return f"{dt.month}月{dt.day}日 {dt:%H:%M}"


# --------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotificationRule:
    party: str  # merchant | buyer | ops | concerned
    channels: tuple[str, ...]
    template: str  # may contain "{party}", filled with the resolved party
    urgent: bool | None = None  # None = as the notice says


@dataclass(frozen=True)
class SmsTemplate:
    name: str
    text: str  # the text registered with the provider (Aliyun ${name} placeholders)
    params: Mapping[str, str]  # parameter name -> Jinja expression (order matters)
    codes: Mapping[str, str]  # provider -> template code ("" = not configured)


class NotificationPolicy:
    def __init__(
        self,
        rules: Mapping[str, Sequence[NotificationRule]],
        labels: Mapping[str, Mapping[str, str]],
        sms_templates: Mapping[str, SmsTemplate],
        env: jinja2.Environment,
        default_tz: str = CHINA_TZ_NAME,
    ) -> None:
        self._rules = {k: tuple(v) for k, v in rules.items()}
        self._labels = labels
        self._sms = dict(sms_templates)
        self._env = env
        self._sms_params: dict[str, jinja2.Template] = {}
        self.default_tz = default_tz
        env.filters.update(
            yuan=yuan,
            local_time=self._local_time,
            step_name=lambda s: self._label("step", s),
            party_name=lambda s: self._label("party", s),
            kind_name=lambda s: self._label("kind", s),
            action_name=lambda s: self._label("action", s),
            resolution_name=lambda s: self._label("resolution", s),
            decision_name=lambda s: self._label("decision", s),
            effect_name=self._effect,
        )
        self._check()

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        templates_dir: Path | str | None = None,
        sms_codes: Path | str | None = None,
    ) -> NotificationPolicy:
        """Read the policy and its templates.

        `path`: a policy TOML file, or a folder holding policy.toml (and templates/);
        None = the policy shipped in this package. `templates_dir` overrides where the
        templates are. `sms_codes`: a TOML file mapping template names to the provider
        template codes of *your* SMS account (see templates/sms.toml), overriding the
        shipped (empty) codes.
        """
        p = Path(path) if path is not None else DEFAULT_POLICY_FILE
        if p.is_dir():
            p = p / "policy.toml"
        with p.open("rb") as f:
            data = tomllib.load(f)
        tdir = Path(templates_dir) if templates_dir is not None else p.parent / "templates"
        if not tdir.is_dir():
            tdir = DEFAULT_TEMPLATES_DIR

        rules: dict[str, list[NotificationRule]] = {}
        for reason, entries in (data.get("reasons") or {}).items():
            for e in entries:
                rules.setdefault(reason, []).append(
                    NotificationRule(
                        party=str(e["party"]),
                        channels=tuple(e.get("channels", CHANNELS)),
                        template=str(e["template"]),
                        urgent=e.get("urgent"),
                    )
                )

        with (tdir / "sms.toml").open("rb") as f:
            sms_data = tomllib.load(f)
        overrides: dict[str, Any] = {}
        if sms_codes is not None:
            with Path(sms_codes).open("rb") as f:
                overrides = tomllib.load(f)
        sms: dict[str, SmsTemplate] = {}
        for name, t in sms_data.items():
            codes = {k: str(v) for k, v in (t.get("codes") or {}).items()}
            codes.update({k: str(v) for k, v in (overrides.get(name) or {}).items()})
            sms[name] = SmsTemplate(
                name=name,
                text=str(t["text"]),
                params={k: str(v) for k, v in (t.get("params") or {}).items()},
                codes=codes,
            )
        unknown = set(overrides) - set(sms)
        if unknown:
            raise PolicyError(f"sms codes for unknown templates: {sorted(unknown)}")

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(tdir / "email")),
            # A missing parameter is a bug in the policy or the notice: fail loudly at
            # render (-> permanent failure, recorded) instead of sending "您的售后单 ".
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # noqa: S701 - plain-text mail, not HTML
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            # Templates ship with the code: no stat() of the file on every render.
            auto_reload=False,
        )
        return cls(
            rules=rules,
            labels=data.get("labels") or {},
            sms_templates=sms,
            env=env,
            default_tz=str(data.get("default_tz", CHINA_TZ_NAME)),
        )

    def _check(self) -> None:
        """Every rule must name known parties/channels and templates that exist."""
        for reason, rules in self._rules.items():
            for r in rules:
                if r.party not in (*PARTIES, CONCERNED):
                    raise PolicyError(f"{reason}: unknown party {r.party!r}")
                for ch in r.channels:
                    if ch not in CHANNELS:
                        raise PolicyError(f"{reason}: unknown channel {ch!r}")
                parties = PARTIES if r.party == CONCERNED else (r.party,)
                for party in parties:
                    name = r.template.format(party=party)
                    if "sms" in r.channels and name not in self._sms:
                        raise PolicyError(f"{reason}: no SMS template {name!r} in sms.toml")
                    if "email" in r.channels:
                        try:
                            t = self._env.get_template(f"{name}.j2")
                        except jinja2.TemplateNotFound:
                            raise PolicyError(
                                f"{reason}: no email template email/{name}.j2"
                            ) from None
                        if not {"subject", "body"} <= set(t.blocks):
                            raise PolicyError(f"email/{name}.j2 needs blocks subject and body")

    # ---- queries ------------------------------------------------------------------------

    @property
    def reasons(self) -> frozenset[str]:
        return frozenset(self._rules)

    def sms_template(self, name: str) -> SmsTemplate:
        return self._sms[name]

    def missing_sms_codes(self, provider: str) -> list[str]:
        """SMS templates used by the policy that have no code for `provider` (check at start)."""
        used: set[str] = set()
        for rules in self._rules.values():
            for r in rules:
                if "sms" in r.channels:
                    parties = PARTIES if r.party == CONCERNED else (r.party,)
                    used.update(r.template.format(party=p) for p in parties)
        return sorted(n for n in used if not self._sms[n].codes.get(provider))

    # ---- expand -------------------------------------------------------------------------

    def expand(
        self,
        notice: Any,
        contacts: Mapping[str, Mapping[str, str]] | None,
        ops_contacts: OpsContacts | Mapping[str, Any] | None = None,
    ) -> list[NotificationRequest]:
        """The notifications a notice causes: one per (recipient address, channel).

        `notice`: a domain `Notice` or a dict with reason, case_id, step, party, due_at,
        urgent, params. `contacts`: the case contacts {"buyer": {"phone","email"[,"tz"]},
        "merchant": {...}}. A party without an address for a channel is skipped (nothing
        to send to); an unknown reason gives no notifications.
        """
        n = _NoticeView.of(notice)
        ops = _ops(ops_contacts)
        contacts = contacts or {}
        due_text = None if n.due_at in (None, "") else _as_datetime(n.due_at).isoformat()
        deadline_text = _deadline_text(n.due_at)  # once per notice, not per recipient
        if n.due_at in (None, "") and n.params.get("event_id"):
            # No deadline to tell two notices apart (a paused case: a second intervention
            # request on it): the event that caused the notice does, so each one notifies
            # and a redelivered event still does not notify twice.
            deadline_text = f"event:{n.params['event_id']}"
        notice_params = _json_safe(n.params)
        out: list[NotificationRequest] = []
        seen: set[str] = set()
        for rule in self._rules.get(n.reason, ()):
            party = rule.party
            if party == CONCERNED:
                if not n.party:
                    continue
                party = _PARTY_ALIASES.get(n.party, n.party)
                if party not in PARTIES:
                    continue
            template = rule.template.format(party=party)
            urgent = n.urgent if rule.urgent is None else bool(rule.urgent)
            for channel in rule.channels:
                for address, tz in self._addresses(party, channel, contacts, ops):
                    key = _dedup_key(n.case_id, n.reason, deadline_text, address, channel)
                    if key in seen:  # two rules reaching one person: one message
                        continue
                    seen.add(key)
                    # step / due_at / tz ride in params too: the notifications row keeps
                    # only params, and render() needs them after the row is read back.
                    params = dict(notice_params)
                    params.update(step=n.step, due_at=due_text, tz=tz or self.default_tz)
                    out.append(
                        NotificationRequest(
                            dedup_key=key,
                            case_id=n.case_id,
                            reason=n.reason,
                            party=party,
                            channel=channel,
                            recipient=address,
                            template=template,
                            params=MappingProxyType(params),
                            urgent=urgent,
                            step=n.step,
                            due_at=due_text,
                            tz=tz or self.default_tz,
                        )
                    )
        return out

    @staticmethod
    def _addresses(
        party: str,
        channel: str,
        contacts: Mapping[str, Mapping[str, str]],
        ops: OpsContacts,
    ) -> list[tuple[str, str | None]]:
        field_name = "email" if channel == "email" else "phone"
        if party == "ops":
            addrs = ops.emails if channel == "email" else ops.phones
            return [(a, ops.tz) for a in addrs]
        c = contacts.get(party) or {}
        a = (c.get(field_name) or "").strip()
        return [(a, c.get("tz") or None)] if a else []

    # ---- render -------------------------------------------------------------------------

    def context(self, request: NotificationRequest) -> dict[str, Any]:
        """Template variables: the notice params plus what every template may use."""
        ctx: dict[str, Any] = dict(request.params)
        ctx.update(
            case_id=request.case_id,
            party=request.party,
            step=request.step,
            due_at=request.due_at,
            urgent=request.urgent,
            tz=request.tz or self.default_tz,
            # The notice's own reason; `reason` stays whatever the params say (the buyer's
            # reason for the request, on case.opened).
            notice_reason=request.reason,
            # The amount a message talks about, in fen: the refund when there is one.
            money_fen=_first_int(ctx.get("refund_fen"), ctx.get("amount_fen")),
        )
        return ctx

    def render(self, request: NotificationRequest) -> RenderedMessage:
        """Raises PolicyError when the template or a parameter is missing."""
        ctx = self.context(request)
        tz = ctx["tz"]
        # Filters read the recipient's zone through this per-render value.
        token = _RENDER_TZ.set(tz)
        try:
            if request.channel == "email":
                return self._render_email(request, ctx)
            if request.channel == "sms":
                return self._render_sms(request, ctx)
        except jinja2.UndefinedError as exc:
            raise PolicyError(f"template {request.template}: {exc.message}") from exc
        finally:
            _RENDER_TZ.reset(token)
        raise PolicyError(f"unknown channel {request.channel!r}")

    def _render_email(self, request: NotificationRequest, ctx: dict[str, Any]) -> RenderedMessage:
        try:
            t = self._env.get_template(f"{request.template}.j2")
        except jinja2.TemplateNotFound:
            raise PolicyError(f"no email template {request.template!r}") from None
        tctx = t.new_context(ctx)
        subject = "".join(t.blocks["subject"](tctx))
        body = "".join(t.blocks["body"](tctx))
        # A header must be one line; templates are free to wrap for readability.
        subject = " ".join(subject.split())
        return RenderedMessage(
            channel="email",
            recipient=request.recipient,
            template=request.template,
            subject=subject,
            body=body.strip() + "\n",
        )

    def _render_sms(self, request: NotificationRequest, ctx: dict[str, Any]) -> RenderedMessage:
        st = self._sms.get(request.template)
        if st is None:
            raise PolicyError(f"no SMS template {request.template!r}")
        values: dict[str, str] = {}
        for name, expr in st.params.items():
            values[name] = self._compiled(expr).render(ctx).strip()
        text = string.Template(st.text).safe_substitute(values)
        return RenderedMessage(
            channel="sms",
            recipient=request.recipient,
            template=request.template,
            body=text,
            template_codes=MappingProxyType(dict(st.codes)),
            template_param=MappingProxyType(values),
        )

    def _compiled(self, expr: str) -> jinja2.Template:
        # Compiling a parameter expression was a tenth of the notifier's time; there are a
        # few dozen of them, so keep each once compiled (a dict is thread-safe enough:
        # two threads compiling the same one at once both get a correct template).
        template = self._sms_params.get(expr)
        if template is None:
            template = self._sms_params[expr] = self._env.from_string(expr)
        return template

    # ---- filters ------------------------------------------------------------------------

    def _label(self, kind: str, value: Any) -> str:
        if value is None or isinstance(value, jinja2.Undefined):
            return ""
        return self._labels.get(kind, {}).get(str(value), str(value))

    def _effect(self, action: Any, kind: Any = None, step: Any = None) -> str:
        """What an automatic action did for this kind (and step): the most specific of
        labels.effect "action.kind.step", "action.kind", "action"; "" if unknown."""
        if action is None or isinstance(action, jinja2.Undefined):
            return ""
        effects = self._labels.get("effect", {})
        for key in (f"{action}.{kind}.{step}", f"{action}.{kind}", str(action)):
            if key in effects:
                return effects[key]
        return ""

    def _local_time(self, v: Any, tz: str | None = None) -> str:
        return local_time(v, tz or _RENDER_TZ.get() or self.default_tz)


# The recipient's zone while one message renders (a ContextVar, so renders in different
# threads of one worker never see each other's zone).
_RENDER_TZ: contextvars.ContextVar[str | None] = contextvars.ContextVar("_RENDER_TZ", default=None)


@dataclass(frozen=True)
class _NoticeView:
    reason: str
    case_id: str
    step: str
    party: str | None
    due_at: datetime | str | None
    urgent: bool
    params: Mapping[str, Any]

    @classmethod
    def of(cls, notice: Any) -> _NoticeView:
        def get(name: str, default: Any = None) -> Any:
            if isinstance(notice, Mapping):
                return notice.get(name, default)
            return getattr(notice, name, default)

        party = get("party")
        return cls(
            reason=str(get("reason")),
            case_id=str(get("case_id")),
            step=str(get("step") or ""),
            party=None if party is None else str(party),
            due_at=get("due_at"),
            urgent=bool(get("urgent", False)),
            params=get("params") or {},
        )


def _first_int(*values: Any) -> int | None:
    for v in values:
        if v is None or v == "":
            continue
        return int(v)
    return None


def _ops(ops: OpsContacts | Mapping[str, Any] | None) -> OpsContacts:
    if ops is None:
        return OpsContacts()
    if isinstance(ops, OpsContacts):
        return ops
    return OpsContacts(
        emails=_split(ops.get("emails", ())),
        phones=_split(ops.get("phones", ())),
        tz=ops.get("tz"),
    )


def _json_safe(v: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _json_value(x) for k, x in v.items()}


def _json_value(v: Any) -> Any:
    if isinstance(v, str | int | float | bool | None):  # the leaves, before the ABC checks
        return v
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, datetime | date):
        return v.isoformat()
    return v
