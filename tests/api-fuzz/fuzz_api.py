#!/usr/bin/env python3
"""API fuzzing of a running clearhouse switch against its own OpenAPI document (schemathesis 4.x).

For every operation in GET /openapi.json, schemathesis generates requests (positive and negative
data); each is signed on the prepared request (so the signature covers the exact path, query and
body sent) as the operator, as an onboarded participant, with a forged secret, or not at all.
Checks: no 5xx (not_a_server_error), and every response conforms to the document
(status_code_conformance, content_type_conformance, response_headers_conformance,
response_schema_conformance).

Before fuzzing it onboards two participants whose endpoint is a stub bank on loopback (accepts
forwarded payments at once, or answers 202 and leaves the decision pending for instruction ids
LATER-...), funds them, makes payments and closes a window, so that known BICs, payment ids and
windows can be mixed into the generated cases, with bodies (JSON and ISO 20022 XML) that can
pass validation. Every participant endpoint the fuzzer sends is rewritten to that stub, so the
switch only ever calls loopback.

Usage: fuzz_api.py --base-url http://127.0.0.1:PORT --operator-key DATA/operator.key
Exits 0 when no check failed, 1 on failures, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import secrets
import string
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hypothesis keeps a directory of its own (.hypothesis in the working directory): not in the repo.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "clearhouse-api-fuzz-hypothesis")
)

import hypothesis  # noqa: E402
import requests  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, strategies as st  # noqa: E402
from requests.auth import AuthBase  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SIGNED_HEADERS = ("x-ch-key-id", "x-ch-timestamp", "x-ch-nonce", "x-ch-signature")
# The two participants the setup onboards; fresh names each run, so reruns on one switch work.
_RUN = "".join(random.SystemRandom().choices(string.ascii_uppercase, k=4))
BANK_A, BANK_B = f"FZ{_RUN}AA", f"FZ{_RUN}BB"


# ---------------------------------------------------------------------------------------------
# Signing (crates/switch/src/auth.rs): HMAC-SHA256(secret,
#   METHOD \n PATH?QUERY \n TIMESTAMP \n NONCE \n hex(SHA-256(body))), hex.


def sign(key_id: str, secret: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
    timestamp = str(int(time.time() * 1000))
    nonce = secrets.token_hex(16)
    message = "\n".join([method, path, timestamp, nonce, hashlib.sha256(body).hexdigest()])
    signature = hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()
    return {
        "x-ch-key-id": key_id,
        "x-ch-timestamp": timestamp,
        "x-ch-nonce": nonce,
        "x-ch-signature": signature,
    }


def body_bytes(body) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    raise TypeError(f"cannot sign a streamed body ({type(body).__name__})")


class Identity(AuthBase):
    """Signs the prepared request (final path?query and body bytes) as one caller.

    key_id None: strips every signature header (an unsigned request)."""

    def __init__(self, name: str, key_id: str | None, secret: bytes | None):
        self.name = name
        self.key_id = key_id
        self.secret = secret

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        for header in SIGNED_HEADERS:
            r.headers.pop(header, None)
        if self.key_id is not None:
            r.headers.update(
                sign(self.key_id, self.secret, r.method, r.path_url, body_bytes(r.body))
            )
        return r


# ---------------------------------------------------------------------------------------------
# A stub bank on loopback: the endpoint of every participant the fuzzer onboards.


class StubBank(BaseHTTPRequestHandler):
    """Accepts every forwarded payment at once (200 ACCP), except those whose instruction id
    starts with LATER-: 202, the decision comes later (POST /v1/payments/{id}/decision)."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        status, answer = 200, b"{}"
        if self.path.endswith("/payments"):
            answer = b'{"status":"ACCP"}'
            try:
                if json.loads(body).get("instruction_id", "").startswith("LATER-"):
                    status = 202
            except (ValueError, AttributeError):
                pass
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def start_stub_bank() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubBank)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


# ---------------------------------------------------------------------------------------------
# Setup: participants, liquidity, a settled payment, a closed window.


class SetupError(Exception):
    pass


def call(base: str, who: Identity, method: str, path: str, payload=None, expect=(200,)):
    data = b"" if payload is None else json.dumps(payload).encode()
    headers = {"content-type": "application/json"} if data else {}
    response = requests.request(
        method, base + path, data=data, headers=headers, auth=who, timeout=30
    )
    if response.status_code not in expect:
        raise SetupError(
            f"setup: {method} {path} as {who.name} answered {response.status_code}: "
            f"{response.text[:500]}"
        )
    return response.json()


def setup(base: str, operator: Identity, stub: str) -> dict:
    participants = {}
    for bic in (BANK_A, BANK_B):
        onboarded = call(
            base,
            operator,
            "POST",
            "/v1/admin/participants",
            {
                "bic": bic,
                "name": f"Fuzz bank {bic}",
                "endpoint": stub,
                "currencies": {
                    "EUR": {"model": "prefunded", "per_payment_max": "5000.00"},
                    "USD": {"model": "deferred_net", "net_debit_cap": "250000.00"},
                },
            },
            expect=(200, 201),
        )
        participants[bic] = Identity(
            bic,
            onboarded["participant"]["key_id"],
            bytes.fromhex(onboarded["secret_hex"]),
        )
        call(
            base,
            operator,
            "POST",
            f"/v1/admin/participants/{bic}/liquidity",
            {"request_id": f"fund-{bic}", "currency": "EUR", "amount": "100000.00", "direction": "in"},
        )
    payments = []
    for n, prefix in enumerate(["FUZZ-", "FUZZ-", "LATER-", "LATER-"]):
        view = call(
            base,
            participants[BANK_A],
            "POST",
            "/v1/payments",
            {
                "instruction_id": f"{prefix}INSTR-{n}",
                "end_to_end_id": f"FUZZ-E2E-{n}",
                "debtor_agent": BANK_A,
                "creditor_agent": BANK_B,
                "amount": "10.00",
                "currency": "EUR",
                "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
            },
            expect=(200, 202),
        )
        payments.append(view)
    if payments[0].get("status") != "ACSC":
        raise SetupError(f"setup: the first payment did not settle: {payments[0]}")
    if payments[2].get("status") != "PDNG":
        print(f"api-fuzz: note: no payment waits for a decision ({payments[2].get('status')}); "
              "sync_wait_ms shorter than settle_deadline_ms makes one", file=sys.stderr)
    call(base, operator, "POST", "/v1/admin/windows/close", {"settle": True})
    return {"participants": participants, "payments": payments}


# ---------------------------------------------------------------------------------------------
# Known values mixed into the generated cases, so that requests reach existing records and get
# past the first validation (schemathesis alone almost never produces a BIC, an amount or an
# ISO 20022 message the switch accepts).

ISO_NS = "urn:iso:std:iso:20022:tech:xsd:"


def text(max_size=40):
    return st.text(max_size=max_size)


def one_of_known(known, max_size=40, weight=2):
    """Mostly (weight to 1) known-good values, sometimes anything."""
    return st.one_of(*[st.sampled_from(known)] * weight, text(max_size))


BICS = one_of_known([BANK_A, BANK_B, "NOSUCHXX"], 12)
AMOUNTS = one_of_known(
    ["0.01", "1.00", "10.00", "4999.99", "5000.00", "5000.01", "0", "0.00", "-1.00", "1.005",
     "1e2", " 1.00", "100000000000000000000000000000000000000.00", "18446744073709551616", "NaN"],
    24,
)
CURRENCIES = one_of_known(["EUR", "USD", "JPY", "XXX", "eur"], 5)
# Fresh valid ids (mostly: a reused id is a duplicate), other valid ids, anything.
UNIQUE_IDS = st.uuids().map(lambda u: "F-" + u.hex[:24])
IDS = st.one_of(
    UNIQUE_IDS, UNIQUE_IDS, st.from_regex(r"[A-Za-z0-9-]{1,35}", fullmatch=True), text(40)
)
# Instruction ids starting with LATER- make the stub bank defer its decision (202).
INSTRUCTION_IDS = st.one_of(IDS, IDS.map(lambda i: "LATER-" + i[:29]))
UETRS = st.one_of(st.uuids(version=4).map(str), st.uuids(version=4).map(str), text(40))
REASONS = one_of_known(["AC04", "AM04", "FOCR", "MS03", "DUPL", "CUST", "NARR", "XXXX"], 6)


PARTY = st.fixed_dictionaries({
    "name": one_of_known(["Alice", "Bob"], 20),
    "account": one_of_known(["DE89370400440532013000", "12345678"], 34),
})


def optional(strategy):
    return st.one_of(st.none(), strategy)


def drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def xml_text(value) -> str:
    return (str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def xml(tag: str, value) -> str:
    return "" if value is None else f"<{tag}>{xml_text(value)}</{tag}>"


def fin(tag: str, bic) -> str:
    return f"<{tag}><FinInstnId>{xml('BICFI', bic)}</FinInstnId></{tag}>"


@st.composite
def pacs008(draw, state):
    amount, ccy = draw(AMOUNTS), draw(CURRENCIES)
    tx = (
        "<CdtTrfTxInf><PmtId>" + xml("InstrId", draw(optional(INSTRUCTION_IDS))) + xml("EndToEndId", draw(IDS))
        + xml("UETR", draw(optional(UETRS))) + "</PmtId>"
        + f'<IntrBkSttlmAmt Ccy="{xml_text(ccy)}">{xml_text(amount)}</IntrBkSttlmAmt>'
        + "<ChrgBr>SLEV</ChrgBr><Dbtr>" + xml("Nm", draw(one_of_known(["Alice"], 20))) + "</Dbtr>"
        + "<DbtrAcct><Id><IBAN>DE89370400440532013000</IBAN></Id></DbtrAcct>"
        + fin("DbtrAgt", draw(one_of_known([BANK_A], 12, weight=5))) + fin("CdtrAgt", draw(BICS))
        + "<Cdtr>" + xml("Nm", draw(one_of_known(["Bob"], 20))) + "</Cdtr>"
        + "<CdtrAcct><Id><IBAN>FR1420041010050500013M02606</IBAN></Id></CdtrAcct></CdtTrfTxInf>"
    )
    count = draw(st.sampled_from([1] * 8 + [2, 0]))
    doc = (
        f'<?xml version="1.0" encoding="UTF-8"?><Document xmlns="{ISO_NS}pacs.008.001.08">'
        "<FIToFICstmrCdtTrf><GrpHdr>" + xml("MsgId", draw(IDS))
        + "<CreDtTm>2025-01-01T12:00:00Z</CreDtTm>" + xml("NbOfTxs", draw(one_of_known(["1"], 3)))
        + "<SttlmInf><SttlmMtd>CLRG</SttlmMtd></SttlmInf></GrpHdr>" + tx * count
        + "</FIToFICstmrCdtTrf></Document>"
    )
    return doc.encode()


def original_refs(draw, state):
    p = draw(st.sampled_from(state["payments"]))
    return (
        xml("OrgnlInstrId", draw(optional(one_of_known([p["instruction_id"]]))))
        + xml("OrgnlEndToEndId", draw(optional(one_of_known([p["end_to_end_id"]]))))
        + xml("OrgnlUETR", draw(optional(one_of_known([p.get("uetr") or ""]))))
    )


@st.composite
def pacs028(draw, state):
    return (
        f'<Document xmlns="{ISO_NS}pacs.028.001.03"><FIToFIPmtStsReq><GrpHdr>'
        + xml("MsgId", draw(IDS)) + "<CreDtTm>2025-01-01T12:00:00Z</CreDtTm></GrpHdr><TxInf>"
        + original_refs(draw, state) + "</TxInf></FIToFIPmtStsReq></Document>"
    ).encode()


@st.composite
def pacs004(draw, state):
    return (
        f'<Document xmlns="{ISO_NS}pacs.004.001.09"><PmtRtr><GrpHdr>' + xml("MsgId", draw(IDS))
        + "<CreDtTm>2025-01-01T12:00:00Z</CreDtTm><NbOfTxs>1</NbOfTxs>"
        + "<SttlmInf><SttlmMtd>CLRG</SttlmMtd></SttlmInf></GrpHdr><TxInf>"
        + xml("RtrId", draw(optional(IDS))) + original_refs(draw, state)
        + f'<RtrdIntrBkSttlmAmt Ccy="{xml_text(draw(CURRENCIES))}">'
        + f"{xml_text(draw(AMOUNTS))}</RtrdIntrBkSttlmAmt><ChrgBr>SLEV</ChrgBr>"
        + "<RtrRsnInf><Rsn>" + xml("Cd", draw(REASONS)) + "</Rsn></RtrRsnInf>"
        + "</TxInf></PmtRtr></Document>"
    ).encode()


def assignment(draw) -> str:
    return (
        "<Assgnmt>" + xml("Id", draw(IDS))
        + "<Assgnr><Agt><FinInstnId>" + xml("BICFI", draw(BICS)) + "</FinInstnId></Agt></Assgnr>"
        + "<Assgne><Agt><FinInstnId>" + xml("BICFI", draw(BICS)) + "</FinInstnId></Agt></Assgne>"
        + "<CreDtTm>2025-01-01T12:00:00Z</CreDtTm></Assgnmt>"
    )


@st.composite
def camt056(draw, state):
    return (
        f'<Document xmlns="{ISO_NS}camt.056.001.08"><FIToFIPmtCxlReq>' + assignment(draw)
        + "<Case>" + xml("Id", draw(IDS)) + "<Cretr><Agt><FinInstnId><BICFI>" + BANK_A
        + "</BICFI></FinInstnId></Agt></Cretr></Case><Undrlyg><TxInf>"
        + xml("CxlId", draw(optional(IDS))) + original_refs(draw, state)
        + "<CxlRsnInf><Rsn>" + xml("Cd", draw(REASONS)) + "</Rsn></CxlRsnInf>"
        + "</TxInf></Undrlyg></FIToFIPmtCxlReq></Document>"
    ).encode()


@st.composite
def camt029(draw, state):
    return (
        f'<Document xmlns="{ISO_NS}camt.029.001.09"><RsltnOfInvstgtn>' + assignment(draw)
        + "<RslvdCase>" + xml("Id", draw(IDS)) + "<Cretr><Agt><FinInstnId><BICFI>" + BANK_A
        + "</BICFI></FinInstnId></Agt></Cretr></RslvdCase>"
        + "<Sts>" + xml("Conf", draw(one_of_known(["CNCL", "RJCR", "ACCR"], 6))) + "</Sts>"
        + "<CxlDtls><TxInfAndSts>" + xml("CxlStsId", draw(optional(IDS)))
        + original_refs(draw, state) + xml("TxCxlSts", draw(optional(one_of_known(["CNCL", "RJCR"]))))
        + "<CxlStsRsnInf><Rsn>" + xml("Cd", draw(REASONS)) + "</Rsn></CxlStsRsnInf>"
        + "</TxInfAndSts></CxlDtls></RsltnOfInvstgtn></Document>"
    ).encode()


def json_payment():
    return st.builds(
        lambda *v: drop_none(dict(zip(
            ["instruction_id", "end_to_end_id", "uetr", "debtor_agent", "creditor_agent",
             "amount", "currency", "debtor", "creditor", "remittance_information"], v))),
        INSTRUCTION_IDS, IDS, optional(UETRS), one_of_known([BANK_A], 12, weight=5), BICS, AMOUNTS, CURRENCIES,
        PARTY, PARTY, optional(text(140)),
    )


def terms():
    return st.builds(
        lambda model, cap, max_, alert: drop_none(
            {"model": model, "net_debit_cap": cap, "per_payment_max": max_,
             "liquidity_alert_below": alert}),
        one_of_known(["prefunded", "deferred_net"], 12),
        optional(AMOUNTS), optional(AMOUNTS), optional(AMOUNTS),
    )


def body_seeds(op, state, stub):
    """A strategy of complete request bodies for this operation, or None."""
    key = (op.method.upper(), op.path)
    if key == ("POST", "/v1/payments"):
        return json_payment()
    if key == ("POST", "/v1/payments/{id}/decision"):
        return st.builds(lambda s, r: drop_none({"status": s, "reason": r}),
                         one_of_known(["ACCP", "ACTC", "RJCT"], 5), optional(REASONS))
    if key == ("POST", "/v1/payments/{id}/return"):
        return st.builds(lambda i, a, r: drop_none({"return_id": i, "amount": a, "reason": r}),
                         IDS, optional(AMOUNTS), REASONS)
    if key == ("POST", "/v1/admin/participants"):
        return st.builds(
            lambda bic, name, currencies, secret: drop_none(
                {"bic": bic, "name": name, "endpoint": stub, "currencies": currencies,
                 "secret_hex": secret}),
            st.one_of(st.from_regex(r"[A-Z]{6}[A-Z0-9]{2}([A-Z0-9]{3})?", fullmatch=True), BICS),
            one_of_known(["Fuzz bank"], 30),
            st.dictionaries(CURRENCIES, terms(), min_size=1, max_size=3),
            optional(st.one_of(st.binary(min_size=16, max_size=32).map(bytes.hex), text(10))),
        )
    if key == ("PATCH", "/v1/admin/participants/{bic}"):
        return st.builds(
            lambda c, cap, max_, alert, below: drop_none(
                {"currency": c, "net_debit_cap": cap, "per_payment_max": max_,
                 "liquidity_alert_below": alert, "allow_below_exposure": below}),
            CURRENCIES, optional(AMOUNTS), optional(AMOUNTS), optional(AMOUNTS),
            optional(st.booleans()),
        )
    if key == ("POST", "/v1/admin/participants/{bic}/liquidity"):
        return st.builds(
            lambda i, c, a, d: {"request_id": i, "currency": c, "amount": a, "direction": d},
            IDS, CURRENCIES, AMOUNTS, one_of_known(["in", "out"], 4),
        )
    xml_bodies = {
        "/v1/iso20022/pacs.008": pacs008, "/v1/iso20022/pacs.028": pacs028,
        "/v1/iso20022/pacs.004": pacs004, "/v1/iso20022/camt.056": camt056,
        "/v1/iso20022/camt.029": camt029,
    }
    if op.path in xml_bodies:
        # Also raw text as the body: schemathesis itself wraps a string body in <data>.
        return st.one_of(xml_bodies[op.path](state), st.binary(max_size=200))
    return None


def with_body(case, body):
    case.body = body
    return case


def seeds_for(op, state: dict) -> list[dict]:
    """Known path and query values: the participants, payments and windows of the setup."""
    path = op.path
    payments = state["payments"]
    out = []
    if "{bic}" in path:
        out += [{"path_parameters": {"bic": bic}} for bic in (BANK_A, BANK_B)]
    if path.startswith("/v1/payments/{id}"):
        out += [{"path_parameters": {"id": p["payment_id"]}} for p in payments]
    if "{window}" in path:
        out += [{"path_parameters": {"window": w}} for w in (1, 2)]
    if path == "/v1/windows/{window}/statement":
        out += [
            {"path_parameters": {"window": 1}, "query": {"participant": bic}}
            for bic in (BANK_A, BANK_B)
        ]
    if path == "/v1/payments" and op.method.upper() == "GET":
        p = payments[0]
        out += [
            {"query": {"payment_id": p["payment_id"]}},
            {"query": {"uetr": p.get("uetr", "")}},
            {"query": {"instruction_id": p["instruction_id"]}},
            {"query": {"end_to_end_id": p["end_to_end_id"], "debtor_agent": BANK_A}},
        ]
    return out


# ---------------------------------------------------------------------------------------------
# Fuzzing.


def is_signed(op) -> bool:
    return bool(op.definition.raw.get("security"))


def describe_request(request: requests.PreparedRequest | None) -> dict:
    if request is None:
        return {}
    body = request.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return {
        "method": request.method,
        "url": request.url,
        "headers": {k: v for k, v in request.headers.items() if k.lower() != "user-agent"},
        "body": (body or "")[:1500],
    }


def shown(text: str) -> str:
    """Printable ASCII (fuzzed bodies hold control characters and any Unicode)."""
    return text.encode("unicode_escape").decode("ascii")


def content_type(response) -> str | None:
    values = response.headers.get("content-type")
    return values[0] if isinstance(values, list) and values else values


class Fuzzer:
    def __init__(self, schema, state, stub, identities, args):
        self.schema = schema
        self.state = state
        self.stub = stub
        self.identities = identities
        self.args = args
        self.requests_sent = 0
        self.statuses = defaultdict(Counter)  # operation -> status -> count
        self.failures = {}  # dedup key -> details
        self.failure_count = 0
        self.errors = []
        self.deadline = time.monotonic() + args.time_budget
        self.out_of_time = False
        self.log = open(args.log, "w") if args.log else None

    def restore(self) -> None:
        """Undo what fuzzing may have done to the two setup participants (suspension, limits,
        liquidity), so that every operation is fuzzed against working participants."""
        operator = self.identities["operator"]
        base = self.schema.get_base_url().rstrip("/")
        for bic in (BANK_A, BANK_B):
            try:
                call(base, operator, "PATCH", f"/v1/admin/participants/{bic}",
                     {"status": "active"})
                call(base, operator, "PATCH", f"/v1/admin/participants/{bic}",
                     {"currency": "EUR", "per_payment_max": "5000.00",
                      "liquidity_alert_below": "0.00"})
                call(base, operator, "POST", f"/v1/admin/participants/{bic}/liquidity",
                     {"request_id": f"refund-{bic}-{secrets.token_hex(8)}", "currency": "EUR",
                      "amount": "10000.00", "direction": "in"})
            except (SetupError, requests.RequestException) as error:
                self.errors.append(f"restoring {bic}: {error}")

    def confine_endpoints(self, case) -> None:
        """The switch calls participants' endpoints: every http(s) endpoint sent is the stub's."""
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("endpoint"), str):
            if body["endpoint"].startswith(("http://", "https://")):
                body["endpoint"] = self.stub

    def run_case(self, op, who: Identity, mode, case) -> None:
        if time.monotonic() > self.deadline:
            self.out_of_time = True
            return
        self.confine_endpoints(case)
        response = None
        try:
            response = case.call(auth=who, timeout=self.args.request_timeout)
            self.requests_sent += 1
            self.statuses[op.label][response.status_code] += 1
            if self.log is not None:
                self.log.write(json.dumps({
                    "operation": op.label, "identity": who.name, "mode": mode.value,
                    "request": describe_request(getattr(response, "request", None)),
                    "status": response.status_code,
                    "content_type": content_type(response),
                    "response": response.text[:300],
                }) + "\n")
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.record(op, who, mode, case, response, failure)
        except Failure as failure:
            self.record(op, who, mode, case, response, failure)
        except requests.RequestException as error:
            self.record(op, who, mode, case, response, None, f"transport error: {error!r}")

    def record(self, op, who, mode, case, response, failure, text=None) -> None:
        self.failure_count += 1
        title = failure.title if failure is not None else text
        status = response.status_code if response is not None else None
        key = (op.label, title, status)
        entry = self.failures.get(key)
        if entry is not None:
            entry["occurrences"] += 1
            entry["identities"].add(who.name)
            return
        request = None
        if response is not None:
            request = getattr(response, "request", None)
        self.failures[key] = {
            "operation": op.label,
            "check": title,
            "message": (failure.message if failure is not None else text)[:1500],
            "identity": who.name,
            "identities": {who.name},
            "mode": mode.value,
            "request": describe_request(request),
            "status": status,
            "response_content_type": content_type(response) if response is not None else None,
            "response_body": response.text[:1500] if response is not None else "",
            "occurrences": 1,
        }

    def fuzz(self, op, who: Identity, mode, examples: int) -> None:
        """Up to `examples` cases of schemathesis' own generation; in positive mode as many
        again with known path/query values and with bodies that can pass validation (separate
        runs, so that each family gets its share)."""
        fixed = {"headers": {"x-ch-signature": "0"}} if is_signed(op) else {}
        runs = [(op.as_strategy(generation_mode=mode, **fixed), examples)]
        if mode == schemathesis.GenerationMode.POSITIVE:
            seeds = seeds_for(op, self.state)
            bodies = body_seeds(op, self.state, self.stub)
            seeded = [op.as_strategy(generation_mode=mode, **fixed, **seed) for seed in seeds]
            if seeded:
                runs.append((st.one_of(*seeded), max(2, examples // 2)))
            if bodies is not None:
                cases = st.one_of(runs[0][0], *seeded)
                runs.append((st.builds(with_body, cases, bodies), examples))
        for strategy, count in runs:
            self.run_hypothesis(op, who, mode, strategy, count)

    def run_hypothesis(self, op, who, mode, strategy, examples: int) -> None:
        if examples <= 0 or time.monotonic() > self.deadline:
            self.out_of_time = self.out_of_time or examples > 0
            return

        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=False,
            print_blob=False,
        )
        @hypothesis.seed(self.args.seed)
        @hypothesis.given(case=strategy)
        def test(case):
            self.run_case(op, who, mode, case)

        try:
            test()
        except hypothesis.errors.Unsatisfiable:
            pass  # e.g. nothing to negate in an operation without parameters
        except Exception as error:  # noqa: BLE001 (a generation problem is reported, not fatal)
            self.errors.append(
                f"{op.label} as {who.name} ({mode.value}): {type(error).__name__}: {error}"
            )
            if self.args.verbose:
                traceback.print_exc()

    def run(self) -> None:
        n = self.args.max_examples
        n_negative = max(1, n // 2)
        n_unsigned = self.args.unsigned_examples
        operator = self.identities["operator"]
        participant = self.identities["participant"]
        creditor = self.identities["creditor"]
        forged = self.identities["forged"]
        unsigned = self.identities["unsigned"]
        positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
        operations = self.operations
        for op in operations:
            started = time.monotonic()
            before = self.requests_sent
            if is_signed(op) and op.definition.raw.get("x-caller") == "operator":
                # A participant gets 403 here: a few cases show it.
                plan = [
                    (operator, positive, n),
                    (operator, negative, n_negative),
                    (participant, positive, n_unsigned),
                    (forged, positive, n_unsigned),
                    (unsigned, positive, n_unsigned),
                ]
            elif is_signed(op):
                plan = [
                    (operator, positive, n),
                    (operator, negative, n_negative),
                    (participant, positive, n),
                    (participant, negative, n_negative),
                    (creditor, positive, n // 2),
                    (forged, positive, n_unsigned),
                    (unsigned, positive, n_unsigned),
                ]
            else:
                plan = [(unsigned, positive, n), (unsigned, negative, n_negative)]
            for who, mode, examples in plan:
                self.fuzz(op, who, mode, examples)
            self.restore()
            if self.args.verbose:
                print(
                    f"  {op.label}: {self.requests_sent - before} requests in "
                    f"{time.monotonic() - started:.1f} s",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:18080")
    parser.add_argument("--operator-key", required=True, help="the data dir's operator.key")
    parser.add_argument(
        "--schema", help="check against this OpenAPI file instead of the served /openapi.json"
    )
    parser.add_argument("--max-examples", type=int, default=50, help="per operation and caller")
    parser.add_argument("--unsigned-examples", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=150.0, help="seconds, whole run")
    parser.add_argument("--request-timeout", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (random if unset)")
    parser.add_argument("--report", help="write the failures as JSON to this file")
    parser.add_argument("--log", help="write every request and answer as JSON lines to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    started = time.monotonic()
    base = args.base_url.rstrip("/")

    key_id, secret_hex = open(args.operator_key).read().split()[:2]
    operator = Identity("operator", key_id, bytes.fromhex(secret_hex))
    stub = start_stub_bank()
    try:
        state = setup(base, operator, stub)
    except (SetupError, requests.RequestException, KeyError, ValueError) as error:
        print(f"api-fuzz: {error}", file=sys.stderr)
        return 2
    identities = {
        "operator": operator,
        "participant": state["participants"][BANK_A],
        "creditor": state["participants"][BANK_B],
        "forged": Identity("forged", key_id, os.urandom(32)),
        "unsigned": Identity("unsigned", None, None),
    }

    if args.schema:
        # A document being edited, checked against the running (older) binary.
        schema = schemathesis.openapi.from_path(args.schema)
        schema.config.update(base_url=base)
    else:
        schema = schemathesis.openapi.from_url(base + "/openapi.json", timeout=10)
    fuzzer = Fuzzer(schema, state, stub, identities, args)
    # Every operation of the document (get_all_operations leaves GET /openapi.json out).
    operations, invalid = [], []
    for path, item in schema.raw_schema["paths"].items():
        for method in item:
            if method.lower() not in ("get", "put", "post", "delete", "options", "head", "patch",
                                      "trace"):
                continue
            try:
                operations.append(schema[path][method.upper()])
            except Exception as error:  # noqa: BLE001
                invalid.append(f"{method.upper()} {path}: {error}")
    fuzzer.operations = operations
    print(
        f"api-fuzz: schemathesis {schemathesis.__version__}, {len(operations)} operations, "
        f"seed {args.seed}, up to {args.max_examples} examples per operation and caller",
        flush=True,
    )
    fuzzer.run()
    elapsed = time.monotonic() - started

    for text in invalid:
        print(f"invalid operation in the document: {text}")
    for text in fuzzer.errors:
        print(f"error: {shown(text)}")
    for n, entry in enumerate(fuzzer.failures.values(), 1):
        request = entry["request"]
        print(f"\n--- failure {n}: {entry['operation']}: {entry['check']} "
              f"({entry['occurrences']}x, as {', '.join(sorted(entry['identities']))}, {entry['mode']})")
        if entry["message"]:
            print(entry["message"])
        if request:
            print(f"request: {request['method']} {request['url']}")
            if request["body"]:
                print(f"request body: {shown(request['body'][:500])}")
        print(f"response: {entry['status']} {entry['response_content_type'] or '(no content-type)'} "
              f"{shown(entry['response_body'][:500])}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(
                [{**e, "identities": sorted(e["identities"])} for e in fuzzer.failures.values()],
                f,
                indent=1,
            )

    print("\n== api-fuzz summary")
    for label in sorted(fuzzer.statuses):
        codes = " ".join(f"{c}:{k}" for c, k in sorted(fuzzer.statuses[label].items()))
        print(f"  {label:45} {codes}")
    failed = len(fuzzer.failures) + len(invalid) + len(fuzzer.errors)
    print(
        f"operations tested: {len(fuzzer.statuses)}/{len(operations)}; requests sent: "
        f"{fuzzer.requests_sent}; failures: {fuzzer.failure_count} "
        f"({len(fuzzer.failures)} distinct); errors: {len(fuzzer.errors)}; "
        f"{elapsed:.1f} s; seed {args.seed}"
    )
    if fuzzer.out_of_time:
        print(f"note: the time budget ({args.time_budget:.0f} s) ran out before every example ran")
    passed = len(operations) - len({e["operation"] for e in fuzzer.failures.values()})
    print(f"{passed} passed, {len(operations) - passed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
