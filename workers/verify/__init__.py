"""Authentication of received mail (issue 15 items 2-3): WORK IN PROGRESS, on the branch
wip/verify-receive only, not on main.

Done here: :mod:`.resolver` (dnspython asyncio, TTL cache, coalescing, --dns-server),
:mod:`.spf` over :mod:`.pyspf_fence` (pyspf re-run over prefetched answers), :mod:`.dkim`
(every signature, keys prefetched), :mod:`.dmarc` (publicsuffixlist), :mod:`.arc`
(dkimpy's chain check, keys prefetched), :mod:`.results` (the ``auth`` extension and the
Authentication-Results field, forged ones recognised); tests/test_verify_*.py against
unbound, with mailauth signing and sealing.

To do before it can land: ingest integration (SPF started at MAIL FROM / EHLO, the rest at
end of DATA within one per-message budget; the A-R field prepended to what is stored,
forged A-R renamed; --no-verify, --dns-server, --authserv-id options).  Where, in
workers/ingest/handler.py: ``handle_MAIL`` starts the SPF task (kept on the
IngestEnvelope, cancelled on RSET/QUIT), ``handle_EHLO`` the HELO one; ``handle_DATA``,
before ``_with_trace``, awaits them and runs DKIM/ARC on the client's octets and DMARC on
the From domain (read from the raw header, as the signer does with
``encode.single_address``), renames forged A-R fields in the content after ARC has
checked it, and puts the A-R field above our Received field; ``_store``'s ``arguments``
carry ``auth`` (``Verdicts.as_extension``) into ``_parse_and_pack``.  A verification
failure of ours must end as temperror results, never a 451 or 5xx; memoising SPF
results and DKIM verdicts across messages (the 15% ingest budget); schema/README.md, the
JSON schema and a golden vector for ``auth``; an end-to-end ingest test (swaks/aiosmtplib
sending mailauth-signed mail, DNS down still 250); dependencies in pyproject (dnspython,
pyspf, publicsuffixlist, authres) with their floors and the wheels-only lowest run; an
internals test for pyspf_fence; ruff/mypy clean; bench/ingest.py with verification on and
off, end-of-DATA p99.
"""
