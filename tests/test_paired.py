"""infer.paired: the paired tau difference and its standard error, on answers every method reached."""

import json
import math

import pytest

from infer import paired


def _report(**tau_runs):
    return {"complete": False, "methods": {name: {"tau_runs": runs} for name, runs in tau_runs.items()}}


def test_the_difference_pairs_answers_by_index_and_skips_missing_ones():
    report = _report(full=[1.0, 1.5, 2.0, 1.2, None], var=[1.1, 1.8, 2.0, 1.3, 1.4, 1.9])
    r = paired.paired(report, "full", "var")
    diffs = [0.1, 0.3, 0.0, 0.1]  # the 5th answer has no base tau, the 6th no base run: both dropped
    assert r["n"] == 4
    assert r["diff"] == pytest.approx(sum(diffs) / 4)
    se = math.sqrt(sum((d - 0.125) ** 2 for d in diffs) / 3) / 2
    assert r["se"] == pytest.approx(se) and r["z"] == pytest.approx(0.125 / se)
    assert (r["base_tau"], r["tau"]) == (pytest.approx(5.7 / 4), pytest.approx(6.2 / 4))
    # a shift common to all answers has no spread: the sign of the difference, infinitely many errors away
    assert paired.paired(_report(a=[1.0, 2.0], b=[0.5, 1.5]), "a", "b")["z"] == -math.inf


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="'nope' is not a method"):
        paired.paired(_report(full=[1.0, 2.0]), "full", "nope")
    with pytest.raises(ValueError, match="share 1 answers"):
        paired.paired(_report(full=[1.0, None], var=[1.0, 1.0]), "full", "var")
    with pytest.raises(ValueError, match="no tau_runs"):
        paired.paired({"methods": {"full": {"tau_runs": [1.0, 1.0]}, "old": {"tau": 1.2}}}, "full", "old")


def test_the_command_prints_one_row_per_method(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_report(full=[1.0, 1.2, 1.4], a=[1.1, 1.3, 1.6], b=[1.0, 1.1, 1.4])))
    assert paired.main([str(path), "full", "a", "b"]) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "+0.133" in rows[0] and "-0.033" in rows[1]
    assert "partial report" in out.err
    with pytest.raises(SystemExit):
        paired.main([str(path), "full", "c"])
