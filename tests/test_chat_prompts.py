"""Chat prompts for drafter training (train/chat_prompts.py): every category, none of the suite's sources."""

import json

import pytest

from infer import make_suite
from specblock_jax import data
from train import chat_prompts

SHARED = make_suite.DEFAULT_SHARED_DATA
PLAY = ("HAMLET\nTo be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles.\n\nOPHELIA\nGood my lord, "
        "how does your honour for this many a day? I have remembrances of yours that I have longed long to "
        "redeliver.\n")


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    root = tmp_path_factory.mktemp("plays")
    for i in range(4):
        text = "".join(PLAY.replace("HAMLET", f"HAMLET {j}").replace("question", f"question {j}")
                       for j in range(40 * i, 40 * i + 40))
        (root / f"play{i}_gut.txt").write_text(text)
    return data.load_documents("prose", root)


@pytest.mark.skipif(not (SHARED / "gsm8k_train.jsonl").is_file(), reason="needs ../shared/data")
def test_prompts_cover_every_category_and_leave_the_suite_out(plays, tmp_path):
    rows = chat_prompts.build(SHARED, per_category=12, plays=plays)
    assert rows == chat_prompts.build(SHARED, per_category=12, plays=plays)  # deterministic
    counts = {c: sum(r["category"] == c for r in rows) for c in chat_prompts.CATEGORIES}
    assert all(0 < n <= 12 for n in counts.values()), counts
    assert counts["math"] == counts["code"] == 12
    assert not {r["source"] for r in rows} & make_suite.suite_sources()
    gsm8k = [json.loads(line) for line in (SHARED / "gsm8k_train.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["messages"][0]["role"] == "user" and len(row["messages"]) == 1
        assert len(row["messages"][0]["content"]) <= make_suite.MAX_PROMPT_CHARS
        if row["category"] == "math":
            assert row["messages"][0]["content"] == gsm8k[int(row["source"].split(":")[1])]["question"]
    assert rows[0]["category"] == "math" and rows[1]["category"] == "code"  # interleaved


@pytest.mark.skipif(not (SHARED / "gsm8k_train.jsonl").is_file(), reason="needs ../shared/data")
def test_excluded_sources_are_left_out(plays):
    """`exclude` (the training prompts' sources) leaves those prompts out: serving prompts built that
    way share no source with the training ones, and the categories with more sources still fill up."""
    training = chat_prompts.build(SHARED, per_category=12, plays=plays)
    serving = chat_prompts.build(SHARED, per_category=12, plays=plays,
                                 exclude=frozenset(r["source"] for r in training))
    assert not {r["source"] for r in serving} & {r["source"] for r in training}
    assert sum(r["category"] == "math" for r in serving) == 12


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        chat_prompts.main(["--per-category", "0"])
    assert "--per-category must be >= 1" in capsys.readouterr().err
    assert chat_prompts.main(["--shared-data", "/nonexistent", "--per-category", "1"]) == 2
