"""The checker itself: known accepted/outcome sets give known lost/duplicate figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.ledger import (
    Ledger,
    figure_line,
    id_in_headers,
    id_in_raw,
    new_id,
    subject_with,
    write_figures,
)


def test_nothing_lost_when_every_accepted_id_has_an_outcome() -> None:
    ledger = Ledger("t")
    for n in range(5):
        ledger.accept(f"m{n}")
    ledger.record_all("delivered", ["m0", "m1", "m2"])
    ledger.record_all("dead", ["m3", "m4"])
    assert ledger.lost() == set()
    assert ledger.duplicates() == 0
    ledger.check()


def test_accepted_without_outcome_is_lost() -> None:
    ledger = Ledger("t")
    for n in range(4):
        ledger.accept(f"m{n}")
    ledger.record("delivered", "m0")
    ledger.record("dead", "m2")
    assert ledger.lost() == {"m1", "m3"}
    with pytest.raises(AssertionError, match="2 accepted but lost"):
        ledger.check()


def test_only_the_named_kinds_settle() -> None:
    ledger = Ledger("t")
    ledger.accept("m0")
    ledger.record("stored", "m0")
    assert ledger.lost() == {"m0"}  # default kinds: delivered, dead
    assert ledger.lost(["stored"]) == set()


def test_duplicates_are_extra_copies_of_one_kind() -> None:
    ledger = Ledger("t")
    for n in range(3):
        ledger.accept(f"m{n}")
    ledger.record_all("delivered", ["m0", "m0", "m0", "m1", "m2", "m2"])
    assert ledger.duplicates() == 3
    assert ledger.duplicate_ids() == {"m0": 3, "m2": 2}
    ledger.check(max_duplicates=3)
    with pytest.raises(AssertionError, match="3 duplicates > 2"):
        ledger.check(max_duplicates=2)


def test_indeterminate_and_rejected_are_no_promise() -> None:
    ledger = Ledger("t")
    ledger.accept("ok")
    ledger.mark_indeterminate("maybe")
    ledger.reject("no", 451)
    ledger.record_all("stored", ["ok", "maybe"])
    assert ledger.lost(["stored"]) == set()
    assert ledger.phantoms(["stored"]) == set()
    # a refused message that is stored anyway is a phantom (a retrying sender duplicates it)
    ledger.record("stored", "no")
    assert ledger.phantoms(["stored"]) == {"no"}


def test_a_retry_that_is_accepted_clears_the_refusal() -> None:
    ledger = Ledger("t")
    ledger.reject("m0", 451)
    ledger.mark_indeterminate("m0")
    ledger.accept("m0", receipt="1-0")
    assert ledger.rejected == {}
    assert ledger.indeterminate == set()
    assert ledger.accepted == {"m0": "1-0"}
    ledger.reject("m0", 451)  # a later refusal does not take back the promise
    assert "m0" in ledger.accepted
    assert "m0" not in ledger.rejected


def test_outcomes_never_sent_fail_the_check() -> None:
    ledger = Ledger("t")
    ledger.accept("m0")
    ledger.record_all("delivered", ["m0", "zz"])
    assert ledger.strangers() == {"zz"}
    with pytest.raises(AssertionError, match="never sent"):
        ledger.check()


def test_summary_counts() -> None:
    ledger = Ledger("t")
    for n in range(4):
        ledger.accept(f"m{n}")
    ledger.mark_indeterminate("m9")
    ledger.reject("m8", 451)
    ledger.record_all("delivered", ["m0", "m1", "m1", "m9"])
    ledger.record_all("dead", ["m2"])
    assert ledger.summary(rate=1.5) == {
        "sent": 6,
        "accepted": 4,
        "indeterminate": 1,
        "rejected": 1,
        "dead": 1,
        "delivered": 3,
        "lost": 1,
        "dup": 1,
        "phantoms": 0,
        "rate": 1.5,
    }


def test_ids_are_found_in_headers_subjects_and_raw_bytes() -> None:
    ledger_id = new_id()
    assert ledger_id != new_id()
    assert id_in_headers({"x-ledger-id": ledger_id}) == ledger_id
    assert id_in_headers({"subject": subject_with(ledger_id)}) == ledger_id
    assert id_in_headers({"subject": "nothing"}) is None
    raw = f"From: a@b\r\nX-Ledger-Id: {ledger_id}\r\n\r\nX-Ledger-Id: other\r\n".encode()
    assert id_in_raw(raw) == ledger_id
    assert id_in_raw(f"Subject: {subject_with(ledger_id)}\n\nbody\n".encode()) == ledger_id
    # an id in the body is not the message's id
    assert id_in_raw(b"Subject: x\r\n\r\nX-Ledger-Id: body\r\n") is None


def test_report_prints_one_line_and_merges_the_json_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "figures.json"
    monkeypatch.setenv("MAILPOOL_CHAOS_FIGURES", str(target))
    ledger = Ledger("alpha")
    ledger.accept("m0")
    ledger.record("stored", "m0")
    ledger.report(["stored"], rate=12.25)
    write_figures("beta", {"lost": 0})
    out = capsys.readouterr().out.strip()
    assert out == (
        "FIGURE alpha: sent=1 accepted=1 indeterminate=0 rejected=0 stored=1 lost=0 dup=0 "
        "phantoms=0 rate=12.2"
    )
    data = json.loads(target.read_text())
    assert data["alpha"]["stored"] == 1
    assert data["beta"] == {"lost": 0}
    monkeypatch.setenv("MAILPOOL_CHAOS_FIGURES", str(tmp_path / "dir"))
    assert write_figures("gamma", {"x": 1}) == tmp_path / "dir" / "gamma.json"
    assert figure_line("n", {"a": 1, "b": 2.0}) == "FIGURE n: a=1 b=2.0"


def test_duplicates_of_retried_ids_are_explained() -> None:
    ledger = Ledger("t")
    ledger.reject("retried", 451)
    ledger.accept("retried")
    ledger.mark_indeterminate("cut")
    ledger.accept("cut")
    ledger.accept("once")
    ledger.record_all("stored", ["retried", "retried", "cut", "cut", "once", "once"])
    assert ledger.retried == {"retried", "cut"}
    assert ledger.duplicates("stored") == 3
    assert ledger.unexplained_duplicates("stored") == {"once": 2}
