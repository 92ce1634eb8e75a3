"""Authentication of received mail: SPF, DKIM, DMARC and ARC verdicts (README, *Verification
on receive*).

:mod:`.verifier` is what ingest calls: :meth:`~.verifier.Verifier.start` at MAIL FROM (SPF
of both identities) and :meth:`~.verifier.Verifier.finish` at the end of DATA (DKIM and ARC
at once, then DMARC; the Authentication-Results field; forged ones renamed), within one
budget per message.  Under it: :mod:`.resolver` (dnspython's asyncio resolver behind a TTL
cache that coalesces questions), :mod:`.spf` over :mod:`.pyspf_fence` (pyspf replayed over
answers fetched ahead), :mod:`.dkim` and :mod:`.arc` (dkimpy over keys fetched ahead),
:mod:`.dmarc` (policy and alignment, publicsuffixlist), :mod:`.results` (the ``auth``
extension and the field, authres).  Nothing here raises on a sender's input or a DNS
failure: what cannot be known in time is ``temperror``.
"""
