"""What SPF relies on of pyspf beyond ``spf.query(...).check()``, checked against the
installed release: workers/verify/pyspf_fence.py.

Fails loudly, naming that file, when pyspf is outside the releases the fence was checked
against, when pyspf no longer asks its DNS questions through the module-global
``spf.DNSLookup`` (the fence's hook would be bypassed: real DNS, no budget), or when its
strict mode swallows the fence's NeedLookup."""

from __future__ import annotations

import pytest
import spf

from tests.internals_util import check_release
from workers.verify import pyspf_fence
from workers.verify.resolver import Answer

FENCE = "workers/verify/pyspf_fence.py"


def test_the_installed_pyspf_is_the_checked_release() -> None:
    check_release("pyspf", pyspf_fence.CHECKED_RELEASES, FENCE)


def test_every_question_goes_through_the_fence() -> None:
    assert spf.DNSLookup is pyspf_fence._lookup, f"{FENCE}: spf.DNSLookup was replaced"
    with pytest.raises(pyspf_fence.NeedLookup) as asked:
        pyspf_fence.evaluate({}, "192.0.2.1", "a@example.com", "mx.example.com")
    assert asked.value.key == ("example.com", "TXT")


def test_answers_from_the_table_decide() -> None:
    table = {("example.com", "TXT"): Answer(("v=spf1 -all",), ((b"v=spf1 -all",),))}
    assert pyspf_fence.evaluate(table, "192.0.2.1", "a@example.com", "h")[0] == "fail"
    table = {("example.com", "TXT"): Answer(temporary=True)}
    assert pyspf_fence.evaluate(table, "192.0.2.1", "a@example.com", "h")[0] == "temperror"
