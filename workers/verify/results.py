"""The verdicts of one message, as the ``email.receive`` extension ``auth`` and as an
``Authentication-Results`` field (RFC 8601) with our authserv-id; and what to do with the
message's own Authentication-Results fields that claim our authserv-id (a sender forging
our verdict): they are renamed, not trusted (section 5)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dmarc

from workers.codec.encode import ascii_domain
from workers.verify.arc import ArcResult
from workers.verify.dkim import DkimResult
from workers.verify.dmarc import DmarcResult
from workers.verify.spf import SpfResult

RENAMED = "X-Forged-Authentication-Results"
_PARSER = authres.FeatureContext(authres.dmarc, authres.arc)


@dataclass(frozen=True)
class Verdicts:
    spf_mailfrom: SpfResult | None = None
    spf_helo: SpfResult | None = None
    dkim: tuple[DkimResult, ...] = ()
    dmarc: DmarcResult | None = None
    arc: ArcResult | None = None

    @functools.cached_property
    def extension(self) -> dict[str, Any]:
        """:meth:`as_extension`, made once: remembered verdicts serve many messages, which
        share it (it is packed, never changed)."""
        return self.as_extension()

    def as_extension(self) -> dict[str, Any]:
        """The ``auth`` map of an ``email.receive`` message (schema/README.md)."""
        out: dict[str, Any] = {}
        for name, spf in (("spf_mailfrom", self.spf_mailfrom), ("spf_helo", self.spf_helo)):
            if spf is not None:
                out[name] = {"result": spf.result, "domain": spf.domain}
        out["dkim"] = [
            {"result": d.result, "domain": d.domain, "selector": d.selector,
             "algorithm": d.algorithm}
            for d in self.dkim
        ]  # fmt: skip
        if self.dmarc is not None:
            out["dmarc"] = {
                "result": self.dmarc.result, "domain": self.dmarc.domain,
                "policy": self.dmarc.policy, "aligned": list(self.dmarc.aligned),
            }  # fmt: skip
        if self.arc is not None:
            out["arc"] = {"result": self.arc.result, "instances": self.arc.instances}
        return out

    def texts(self) -> list[str]:
        """Each result as our Authentication-Results field writes it (``spf=pass
        smtp.mailfrom=example.com``; verifier.authentication_results folds between them)."""
        return [str(result) for result in self._results()]

    def _results(self) -> list[Any]:
        # Every value the sender chose (HELO, MAIL FROM domain, d=, s=) is reduced to one
        # token here: nothing it wrote can end our field or start another.
        results: list[Any] = []
        if self.spf_mailfrom is not None:
            results.append(authres.SPFAuthenticationResult(
                result=self.spf_mailfrom.result,
                smtp_mailfrom=_token(self.spf_mailfrom.domain) or None))  # fmt: skip
        if self.spf_helo is not None:
            results.append(authres.SPFAuthenticationResult(
                result=self.spf_helo.result,
                smtp_helo=_token(self.spf_helo.domain) or None))  # fmt: skip
        for d in self.dkim:
            results.append(authres.DKIMAuthenticationResult(
                result=d.result, header_d=_token(d.domain) or None,
                header_s=_token(d.selector) or None,
                header_a=_token(d.algorithm) or None))  # fmt: skip
        if not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        if self.dmarc is not None:
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc.result, header_from=_token(self.dmarc.domain) or None,
                policy=self.dmarc.policy or None))  # fmt: skip
        if self.arc is not None:
            results.append(authres.arc.ARCAuthenticationResult(result=self.arc.result))
        return results


def _token(value: str) -> str:
    """ASCII letters, digits, dots, hyphens, underscores and @, at most 253 (a domain in
    Unicode as its A-label): our field stays one short ASCII line per result."""
    if not value.isascii():
        try:
            value = ascii_domain(value)
        except UnicodeError:
            return ""  # not a domain: nothing rather than a part that reads as another
    return _NOT_TOKEN.sub("", value)[:253]


_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._@-]")


def claims_our_id(value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value speaks for ``authserv_id`` (or cannot be
    read: an unreadable one is not trusted either)."""
    try:
        parsed = _PARSER.parse("Authentication-Results: " + value)
    except Exception:  # authres raises its own and standard errors alike
        return True
    return str(parsed.authserv_id).lower() == authserv_id.lower()


def leads_with_our_id(decoded: str, authserv_id: str) -> bool:
    """Whether a value as the application reads it (decoded: its encoded-words written
    out) starts with ``authserv_id``: its first word before the first ``;``, comments left
    out.  Not authres's parse: decoded text often is no longer valid (a comment's
    ``(café)``), and an unreadable value of another host's is not ours to rename."""
    head = decoded.split(";", 1)[0]
    while (uncommented := _COMMENT.sub(" ", head)) != head:  # innermost first
        head = uncommented
    words = head.split()
    return bool(words) and words[0].lower() == authserv_id.lower()


_COMMENT = re.compile(r"\([^()]*\)")
