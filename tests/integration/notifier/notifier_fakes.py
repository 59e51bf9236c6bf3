"""Local stand-ins for the providers, speaking their real protocols.

- an aiosmtpd SMTP server (optionally STARTTLS / implicit TLS + AUTH) that records mail
  and answers scripted RCPT codes;
- HTTP servers impersonating Aliyun's and Tencent's SendSms that check the request and
  recompute its signature the way the provider does. The verification code here is
  written independently of the adapters (from the providers' documentation), so a
  signing mistake in the adapter cannot be mirrored by the check.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, quote_plus, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import wait_for

# ---- TLS -------------------------------------------------------------------------------


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 / localhost, made fresh for each test run."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# ---- SMTP --------------------------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    login: str | None
    peer: Any = None  # the client's (host, port): one per connection


@dataclass
class RecordingHandler:
    """aiosmtpd handler: records accepted mail; `rcpt_replies` scripts RCPT answers."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    received: list[ReceivedMail] = field(default_factory=list)
    # Accept the mail, then drop the connection before answering DATA (a crash or a
    # network cut at the worst moment: the client cannot know the mail was taken).
    drop_after_data: bool = False
    # Answer the end of DATA with this instead of accepting the mail (e.g. "554 ...").
    data_reply: str | None = None
    # The server side of each connection that carried a mail (see hang_up).
    servers: list[Any] = field(default_factory=list)

    def connections(self) -> int:
        """How many connections delivered the mail received."""
        return len({m.peer for m in self.received})

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        if server not in self.servers:
            self.servers.append(server)
        if self.data_reply:
            return self.data_reply
        login = session.auth_data.login.decode() if session.authenticated else None
        self.received.append(
            ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, login,
                         session.peer)
        )
        if self.drop_after_data:
            server.transport.close()
        return "250 2.0.0 Message accepted for delivery"


def password_authenticator(user: str, password: str) -> Any:
    def auth(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return auth


# ---- HTTP servers ----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class FakeProvider:
    """Base: runs a ThreadingHTTPServer on 127.0.0.1:<port> (default: a free one) in a
    thread."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []  # accepted SendSms requests
        self.rejections: list[str] = []  # error codes answered
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, payload = provider.handle("POST", self.path, dict(self.headers.items()),
                                                  body)
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json;charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self._server = _Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        # A short poll interval keeps shutdown() (once per test) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError


# ---- Aliyun ------------------------------------------------------------------------------


def aliyun_encode(s: str) -> str:
    """Aliyun's POP encoding as its Java sample writes it: URLEncoder + three fixes."""
    return quote_plus(s, encoding="utf-8").replace("+", "%20").replace("*", "%2A").replace(
        "%7E", "~"
    )


def aliyun_expected_signature(method: str, params: dict[str, str], secret: str) -> str:
    pairs = sorted((k, v) for k, v in params.items() if k != "Signature")
    canonical = "&".join(aliyun_encode(k) + "=" + aliyun_encode(v) for k, v in pairs)
    to_sign = method + "&" + aliyun_encode("/") + "&" + aliyun_encode(canonical)
    mac = hmac.new((secret + "&").encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


ALIYUN_REQUIRED = (
    "Action", "Version", "Format", "AccessKeyId", "SignatureMethod", "SignatureVersion",
    "SignatureNonce", "Timestamp", "Signature", "RegionId", "PhoneNumbers", "SignName",
    "TemplateCode", "TemplateParam",
)


class FakeAliyun(FakeProvider):
    """`behaviour`: phone number -> (http status, Code, Message) to answer instead of OK."""

    def __init__(self, keys: dict[str, str], behaviour: dict[str, tuple[int, str, str]] | None
                 = None, port: int = 0) -> None:
        super().__init__(port)
        self.keys = keys
        self.behaviour = behaviour or {}
        self._nonces: set[str] = set()

    def _error(self, status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.rejections.append(code)
        return status, {"RequestId": str(uuid.uuid4()), "Code": code, "Message": message}

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, Any]]:
        query = urlsplit(path).query
        params = dict(parse_qsl(query, keep_blank_values=True))
        params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        missing = [p for p in ALIYUN_REQUIRED if not params.get(p)]
        if missing:
            return self._error(400, "MissingParameter", f"missing {missing[0]}")
        if params["Action"] != "SendSms" or params["Version"] != "2017-05-25":
            return self._error(400, "InvalidAction.NotFound", "unknown action/version")
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            return self._error(400, "InvalidSignatureMethod", "bad signature method")
        secret = self.keys.get(params["AccessKeyId"])
        if secret is None:
            return self._error(404, "InvalidAccessKeyId.NotFound", "Specified access key is "
                                                                    "not found.")
        try:
            ts = dt.datetime.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=dt.UTC)
        except ValueError:
            return self._error(400, "InvalidTimeStamp.Format", "bad timestamp")
        if abs((dt.datetime.now(dt.UTC) - ts).total_seconds()) > 900:
            return self._error(400, "InvalidTimeStamp.Expired", "timestamp expired")
        expected = aliyun_expected_signature(method, params, secret)
        if not hmac.compare_digest(expected, params["Signature"]):
            return self._error(400, "SignatureDoesNotMatch",
                               "Specified signature is not matched with our calculation.")
        with self._lock:
            if params["SignatureNonce"] in self._nonces:
                return self._error(400, "SignatureNonceUsed", "nonce used")
            self._nonces.add(params["SignatureNonce"])
        try:
            json.loads(params["TemplateParam"])
        except ValueError:
            return self._error(200, "isv.INVALID_JSON_PARAM", "JSON参数不合法")
        phone = params["PhoneNumbers"]
        if phone in self.behaviour:
            return self._error(*self.behaviour[phone])
        if not re.fullmatch(r"1[3-9]\d{9}|[2-9]\d{7,14}", phone):
            return self._error(200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        with self._lock:
            self.requests.append(params)
        return 200, {"Message": "OK", "RequestId": str(uuid.uuid4()),
                     "BizId": f"{len(self.requests)}^0", "Code": "OK"}


# ---- Tencent -----------------------------------------------------------------------------

_AUTH_RE = re.compile(
    r"^TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[^/]+)"
    r"/tc3_request, SignedHeaders=(?P<signed>[a-z0-9;\-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def tencent_expected_signature(secret_key: str, headers: dict[str, str], body: bytes,
                               signed: list[str], date: str, service: str, ts: str) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{h}:{lower[h].strip().lower()}\n" for h in signed)
    canonical_request = "POST\n/\n\n" + canonical_headers + "\n" + ";".join(signed) + "\n" + \
        hashlib.sha256(body).hexdigest()
    string_to_sign = "TC3-HMAC-SHA256\n" + ts + "\n" + f"{date}/{service}/tc3_request\n" + \
        hashlib.sha256(canonical_request.encode()).hexdigest()

    def h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = h(h(h(("TC3" + secret_key).encode(), date), service), "tc3_request")
    return hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()


class FakeTencent(FakeProvider):
    """`behaviour`: E.164 phone -> send status Code to answer instead of "Ok"."""

    def __init__(self, keys: dict[str, str], app_id: str,
                 behaviour: dict[str, str] | None = None) -> None:
        super().__init__()
        self.keys = keys
        self.app_id = app_id
        self.behaviour = behaviour or {}

    def _error(self, code: str, message: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.rejections.append(code)
        # Tencent answers API errors with HTTP 200 and Response.Error.
        return 200, {"Response": {"Error": {"Code": code, "Message": message},
                                  "RequestId": str(uuid.uuid4())}}

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, Any]]:
        h = {k.lower(): v for k, v in headers.items()}
        if h.get("x-tc-action") != "SendSms":
            return self._error("InvalidAction", "action")
        if h.get("x-tc-version") != "2021-01-11":
            return self._error("InvalidParameter", "version")
        if not h.get("x-tc-region"):
            return self._error("MissingParameter", "X-TC-Region")
        m = _AUTH_RE.match(h.get("authorization", ""))
        if not m:
            return self._error("AuthFailure.SignatureFailure", "malformed Authorization")
        secret = self.keys.get(m["id"])
        if secret is None:
            return self._error("AuthFailure.SecretIdNotFound", "unknown SecretId")
        ts = h.get("x-tc-timestamp", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
            return self._error("AuthFailure.SignatureExpire", "timestamp too far off")
        date = dt.datetime.fromtimestamp(int(ts), dt.UTC).strftime("%Y-%m-%d")
        if m["date"] != date or m["service"] != "sms":
            return self._error("AuthFailure.SignatureFailure", "credential scope")
        signed = m["signed"].split(";")
        if signed != sorted(signed) or not {"content-type", "host"} <= set(signed) or any(
            s not in h for s in signed
        ):
            return self._error("AuthFailure.SignatureFailure", "signed headers")
        expected = tencent_expected_signature(secret, headers, body, signed, date, "sms", ts)
        if not hmac.compare_digest(expected, m["sig"]):
            return self._error("AuthFailure.SignatureFailure",
                               "The provided credentials could not be validated.")
        req = json.loads(body)
        for key in ("PhoneNumberSet", "SmsSdkAppId", "SignName", "TemplateId"):
            if not req.get(key):
                return self._error("MissingParameter", key)
        if req["SmsSdkAppId"] != self.app_id:
            return self._error("UnauthorizedOperation.SmsSdkAppIdVerifyFail", "app id")
        if not all(isinstance(p, str) for p in req.get("TemplateParamSet", [])):
            return self._error("InvalidParameterValue.TemplateParameterFormatError", "params")
        statuses = []
        for phone in req["PhoneNumberSet"]:
            code = self.behaviour.get(phone)
            if code is None and not re.fullmatch(r"\+861[3-9]\d{9}", phone):
                code = "InvalidParameterValue.IncorrectPhoneNumber"
            statuses.append({
                "SerialNo": "" if code else f"2028:{uuid.uuid4().hex[:12]}",
                "PhoneNumber": phone, "Fee": 0 if code else 1,
                "SessionContext": req.get("SessionContext", ""),
                "Code": code or "Ok", "Message": "send success" if not code else code,
                "IsoCode": "CN",
            })
        with self._lock:
            if all(s["Code"] == "Ok" for s in statuses):
                self.requests.append(req)
            else:
                self.rejections.extend(s["Code"] for s in statuses if s["Code"] != "Ok")
        return 200, {"Response": {"SendStatusSet": statuses, "RequestId": str(uuid.uuid4())}}


def hang_up(controller: Controller, server: Any, goodbye: bytes | None = None) -> None:
    """Close one server-side connection, as a relay does to an idle client (Postfix first
    says "421 4.4.2 ... timeout exceeded"; others just close); returns once it is closed."""
    def close() -> None:
        if server.transport is not None:
            if goodbye:
                server.transport.write(goodbye)
            server.transport.close()

    controller.loop.call_soon_threadsafe(close)
    # aiosmtpd clears the transport in connection_lost
    wait_for(lambda: server.transport is None, timeout=5, interval=0.01,
             what="the server's side of the connection to close")


def start_smtp(handler: RecordingHandler, port: int, **kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    return controller
