"""The verdicts of one message, as the ``email.receive`` extension ``auth`` and as an
``Authentication-Results`` field (RFC 8601) with our authserv-id; and what to do with the
message's own Authentication-Results fields that claim our authserv-id (a sender forging
our verdict): they are renamed, not trusted (section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dmarc

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

    def header(self, authserv_id: str) -> str:
        """``Authentication-Results: ...`` (one line; the builder of the stored message
        folds it)."""
        results: list[Any] = []
        if self.spf_mailfrom is not None:
            mailfrom = self.spf_mailfrom
            results.append(authres.SPFAuthenticationResult(
                result=mailfrom.result, smtp_mailfrom=mailfrom.domain))  # fmt: skip
        if self.spf_helo is not None:
            results.append(authres.SPFAuthenticationResult(
                result=self.spf_helo.result, smtp_helo=self.spf_helo.domain))  # fmt: skip
        for d in self.dkim:
            results.append(authres.DKIMAuthenticationResult(
                result=d.result, header_d=d.domain or None, header_s=d.selector or None,
                header_a=d.algorithm or None))  # fmt: skip
        if not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        if self.dmarc is not None:
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc.result, header_from=self.dmarc.domain,
                policy=self.dmarc.policy or None))  # fmt: skip
        if self.arc is not None:
            results.append(authres.arc.ARCAuthenticationResult(result=self.arc.result))
        return str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))


def claims_our_id(value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value speaks for ``authserv_id`` (or cannot be
    read: an unreadable one is not trusted either)."""
    try:
        parsed = _PARSER.parse("Authentication-Results: " + value)
    except Exception:  # authres raises its own and standard errors alike
        return True
    return str(parsed.authserv_id).lower() == authserv_id.lower()
