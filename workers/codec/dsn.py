"""Delivery status notification requests (RFC 3461): the SMTP parameters and the ``dsn`` key.

A sender asks for notifications with four parameters: ``RET`` (``FULL`` or ``HDRS``: what a
failure report returns) and ``ENVID`` (the sender's id of the transaction) on MAIL FROM;
``NOTIFY`` (``NEVER``, or any of ``SUCCESS``, ``FAILURE``, ``DELAY``) and ``ORCPT`` (the
original recipient, ``addr-type;address``) on each RCPT TO.  ``ENVID`` and ``ORCPT``'s address
are xtext on the wire (``+`` and two hex digits for ``+``, ``=``, controls, space).

Receive and send messages carry them in one extension key of the same shape, decoded::

    "dsn": {"ret": "HDRS", "envid": "QQ314159",
            "recipients": {"bob@example.org": {"notify": ["SUCCESS", "FAILURE"],
                                               "orcpt": "rfc822;bob@example.org"}}}

Every key is optional; ``recipients`` is keyed by the address as it is in ``to``.  No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from workers.codec.errors import SchemaError

RET_VALUES = ("FULL", "HDRS")
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
NEVER = "NEVER"
MAX_ENVID = 100  # octets of xtext (RFC 3461 section 4.4)
MAX_ORCPT = 500  # octets of the whole parameter value (RFC 3461 section 4.2)

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEX_ESCAPE = re.compile(r"\+([0-9A-F]{2})")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class DsnError(ValueError):
    """A DSN parameter that is malformed or given twice; ``reply`` is the SMTP reply."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def xtext_decode(text: str) -> str:
    """RFC 3461 section 4: ``+XX`` to the character; ValueError when ``text`` is no xtext or
    an escape stands for an octet outside printable US-ASCII (xtext carries ASCII only)."""
    if not _XTEXT.fullmatch(text):
        raise ValueError("not xtext")
    decoded = _HEX_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not _PRINTABLE.fullmatch(decoded):
        raise ValueError("not printable US-ASCII once decoded")
    return decoded


def xtext_encode(text: str) -> str:
    """The xtext form of printable US-ASCII ``text``: ``+``, ``=`` and space as ``+XX``."""
    return "".join(char if "!" <= char <= "~" and char not in "+=" else f"+{ord(char):02X}"
                   for char in text)  # fmt: skip


# RFC 6533 section 3: utf-8-addr-xtext escapes as "\x{HEX}" (the code point).
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def utf8_addr_decode(text: str) -> str:
    """An ORCPT ``utf-8`` address (utf-8-addr-xtext or -unitext) as plain text; ValueError
    for an escape that is no code point, or a control character or space in the result."""
    try:
        decoded = _UTF8_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
        decoded.encode("utf-8")  # no lone surrogates (invalid UTF-8 read with surrogateescape)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("not a UTF-8 address") from None
    if any(ord(char) < 0x21 or 0x7F <= ord(char) < 0xA0 or char.isspace() for char in decoded):
        raise ValueError("control characters or spaces in the address")
    return decoded


def utf8_addr_encode(address: str) -> str:
    """utf-8-addr-xtext: ASCII graphic characters but ``+``, ``=`` and ``\\`` as they are,
    the rest as ``\\x{HEX}``: the parameter stays ASCII, one token on the command line."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=\\" else f"\\x{{{ord(char):X}}}"
        for char in address
    )


@dataclass
class DsnRequest:
    """The DSN parameters of one SMTP transaction, as the ``dsn`` key holds them."""

    ret: str | None = None
    envid: str | None = None
    recipients: dict[str, dict[str, object]] = field(default_factory=dict)

    def as_entry(self) -> dict[str, object] | None:
        """The ``dsn`` key's value, or None when the sender asked for nothing."""
        entry: dict[str, object] = {}
        if self.ret is not None:
            entry["ret"] = self.ret
        if self.envid is not None:
            entry["envid"] = self.envid
        if self.recipients:
            entry["recipients"] = self.recipients
        return entry or None


def _split(param: str) -> tuple[str, str]:
    keyword, _, value = param.partition("=")
    return keyword.upper(), value


def take_mail_parameters(params: Sequence[str]) -> tuple[DsnRequest, list[str]]:
    """``RET`` and ``ENVID`` taken out of MAIL FROM's parameters: (request, the others)."""
    request, rest = DsnRequest(), []
    for param in params:
        keyword, value = _split(param)
        if keyword == "RET":
            if request.ret is not None:
                raise DsnError("501 5.5.4 RET given twice")
            if value.upper() not in RET_VALUES:
                raise DsnError("501 5.5.4 Bad RET parameter: FULL or HDRS")
            request.ret = value.upper()
        elif keyword == "ENVID":
            if request.envid is not None:
                raise DsnError("501 5.5.4 ENVID given twice")
            request.envid = _envid(value)
        else:
            rest.append(param)
    return request, rest


def _envid(value: str) -> str:
    if not value or len(value) > MAX_ENVID:
        raise DsnError(f"501 5.5.4 Bad ENVID parameter: 1 to {MAX_ENVID} characters of xtext")
    try:
        envid = xtext_decode(value)
    except ValueError as exc:
        raise DsnError(f"501 5.5.4 Bad ENVID parameter: {exc}") from None
    return envid


def take_rcpt_parameters(params: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """``NOTIFY`` and ``ORCPT`` taken out of RCPT TO's parameters: (this recipient's entry
    in ``recipients``, empty when neither was given; the other parameters)."""
    wanted: dict[str, object] = {}
    rest = []
    for param in params:
        keyword, value = _split(param)
        if keyword in ("NOTIFY", "ORCPT") and keyword.lower() in wanted:
            raise DsnError(f"501 5.5.4 {keyword} given twice")
        if keyword == "NOTIFY":
            wanted["notify"] = _notify(value.upper().split(","), "501 5.5.4 Bad NOTIFY parameter")
        elif keyword == "ORCPT":
            wanted["orcpt"] = _orcpt(value)
        else:
            rest.append(param)
    return wanted, rest


def _notify(values: list[str], refusal: str) -> list[str]:
    if values == [NEVER]:
        return values
    if not values or any(v not in NOTIFY_VALUES for v in values) or len(set(values)) < len(values):
        raise DsnError(f"{refusal}: NEVER, or any of SUCCESS, FAILURE, DELAY")
    return values


def _orcpt(value: str) -> str:
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ATOM.fullmatch(addr_type) or not address or len(value) > MAX_ORCPT:
        raise DsnError("501 5.5.4 Bad ORCPT parameter: addr-type;xtext")
    try:
        if addr_type.lower() == "utf-8":  # RFC 6533
            return f"{addr_type};{utf8_addr_decode(address)}"
        return f"{addr_type};{xtext_decode(address)}"
    except ValueError as exc:
        raise DsnError(f"501 5.5.4 Bad ORCPT parameter: {exc}") from None


# -- the send side: the key checked, and turned into parameters again ----------------------


def validate_dsn(value: object, to: Sequence[str], path: str = "dsn") -> None:
    """SchemaError unless ``value`` is a ``dsn`` key a relay can be given for ``to``."""
    if not isinstance(value, dict):
        raise SchemaError(path, "expected map")
    dsn = cast("dict[str, object]", value)
    ret = dsn.get("ret")
    if ret is not None and ret not in RET_VALUES:
        raise SchemaError(f"{path}.ret", "must be FULL or HDRS")
    envid = dsn.get("envid")
    if envid is not None:
        if not isinstance(envid, str) or not envid or not _PRINTABLE.fullmatch(envid):
            raise SchemaError(f"{path}.envid", "expected non-empty printable US-ASCII str")
        if len(xtext_encode(envid)) > MAX_ENVID:
            raise SchemaError(f"{path}.envid", f"over {MAX_ENVID} octets as xtext")
    recipients = dsn.get("recipients")
    if recipients is not None:
        _validate_recipients(recipients, to, f"{path}.recipients")


def _validate_recipients(value: object, to: Sequence[str], path: str) -> None:
    if not isinstance(value, dict):
        raise SchemaError(path, "expected map of recipient to map")
    for rcpt, wanted in cast("dict[object, object]", value).items():
        where = f"{path}[{rcpt!r}]"
        if rcpt not in to:
            raise SchemaError(where, "not a recipient of this message (to)")
        if not isinstance(wanted, dict):
            raise SchemaError(where, "expected map")
        wanted = cast("dict[str, object]", wanted)
        notify = wanted.get("notify")
        if notify is not None:
            if not isinstance(notify, list) or not all(isinstance(v, str) for v in notify):
                raise SchemaError(f"{where}.notify", "expected array of str")
            try:
                _notify(cast("list[str]", notify), "")
            except DsnError:
                raise SchemaError(
                    f"{where}.notify", "NEVER alone, or any of SUCCESS, FAILURE, DELAY"
                ) from None
        orcpt = wanted.get("orcpt")
        if orcpt is not None:
            _validate_orcpt(orcpt, f"{where}.orcpt")


def _validate_orcpt(value: object, path: str) -> None:
    if not isinstance(value, str):
        raise SchemaError(path, "expected str")
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ATOM.fullmatch(addr_type) or not address:
        raise SchemaError(path, "expected addr-type;address, like rfc822;bob@example.org")
    if addr_type.lower() == "utf-8":
        try:
            utf8_addr_decode(address)
        except ValueError as exc:
            raise SchemaError(path, str(exc)) from None
    elif not _PRINTABLE.fullmatch(address):
        raise SchemaError(path, f"a {addr_type} address is printable US-ASCII (else use utf-8;)")
    if len(orcpt_parameter(value)) > MAX_ORCPT + len("ORCPT="):
        raise SchemaError(path, f"over {MAX_ORCPT} octets as xtext")


def orcpt_parameter(orcpt: str) -> str:
    addr_type, _, address = orcpt.partition(";")
    if addr_type.lower() == "utf-8":
        return f"ORCPT={addr_type};{utf8_addr_encode(utf8_addr_decode(address))}"
    return f"ORCPT={addr_type};{xtext_encode(address)}"


def mail_parameters(dsn: Mapping[str, object] | None) -> list[str]:
    """The MAIL FROM parameters for a validated ``dsn`` key."""
    if not dsn:
        return []
    params = []
    if dsn.get("ret"):
        params.append(f"RET={dsn['ret']}")
    if dsn.get("envid"):
        params.append(f"ENVID={xtext_encode(cast('str', dsn['envid']))}")
    return params


def rcpt_parameters(dsn: Mapping[str, object] | None, rcpt: str) -> list[str]:
    """The RCPT TO parameters of ``rcpt`` for a validated ``dsn`` key."""
    recipients = cast("Mapping[str, Mapping[str, object]]", (dsn or {}).get("recipients") or {})
    wanted = recipients.get(rcpt)
    if not wanted:
        return []
    params = []
    if wanted.get("notify"):
        params.append("NOTIFY=" + ",".join(cast("list[str]", wanted["notify"])))
    if wanted.get("orcpt"):
        params.append(orcpt_parameter(cast("str", wanted["orcpt"])))
    return params
