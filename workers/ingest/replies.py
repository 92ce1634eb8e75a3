"""Enhanced status codes (RFC 2034, RFC 3463) on every reply of an ingest session.

The session advertises ``ENHANCEDSTATUSCODES``, which obliges it to put an enhanced code on
every 2xx, 4xx and 5xx reply except the greeting and the replies to HELO and EHLO (RFC 2034
section 3).  Our own replies carry theirs; aiosmtpd's do not all (``250 OK`` to RSET,
``503 Error: nested MAIL command``, ``555 ...``): :func:`with_enhanced_code` gives those the
code that fits their basic code, as Postfix does, and leaves a reply that has one alone.
"""

from __future__ import annotations

import re

# A reply that already has one: "250 2.1.0 OK", "550-5.7.1 ..." (RFC 3463 section 2).
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")

# The enhanced code for a basic code, where the basic code says enough (RFC 3463 and the
# IANA registry's "associated basic status code" column); other codes get X.0.0.
_BY_BASIC = {
    "235": "2.7.0",  # authentication succeeded
    "251": "2.1.5",  # recipient not local, will forward
    "421": "4.3.0",  # service not available, closing
    "450": "4.2.0",  # mailbox unavailable
    "451": "4.3.0",  # local error in processing
    "452": "4.3.1",  # insufficient system storage
    "454": "4.7.0",  # TLS not available / temporary authentication failure
    "500": "5.5.2",  # syntax error, command unrecognised
    "501": "5.5.4",  # syntax error in parameters or arguments
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",  # command parameter not implemented
    "530": "5.7.0",  # authentication or TLS required
    "535": "5.7.8",  # authentication credentials invalid
    "538": "5.7.11",  # encryption required for the mechanism
    "550": "5.0.0",
    "552": "5.3.4",  # message size exceeds limit
    "553": "5.1.3",  # mailbox name not allowed
    "554": "5.7.0",  # aiosmtpd's only 554: "Command refused due to lack of security"
    "555": "5.5.4",  # MAIL/RCPT parameters not recognised or not implemented
}


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an enhanced status code after its basic one when it has none; a 1xx or
    3xx reply (``354``, an AUTH challenge ``334``) and one already coded are returned as is."""
    basic = reply[:3]
    if len(reply) < 3 or reply[0] not in "245" or not basic.isdigit():
        return reply
    if _HAS_ENHANCED.match(reply):
        return reply
    enhanced = _BY_BASIC.get(basic, f"{reply[0]}.0.0")
    separator, text = reply[3:4] or " ", reply[4:]
    return f"{basic}{separator}{enhanced} {text}" if text else f"{basic}{separator}{enhanced}"
