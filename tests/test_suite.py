"""Tests for the committed chat benchmark suite and its builder, infer/make_suite.py."""

import collections
import json
import pathlib
import sys

import pytest

from infer import make_suite

SUITE = make_suite.DEFAULT_OUT
# Where CI and this workspace keep the open prompt data: ../shared/data beside the repository.
SHARED_DATA = make_suite.REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    lines = SUITE.read_text(encoding="utf-8").splitlines()
    assert lines and all(lines), "blank or missing lines in the suite"
    return [json.loads(line) for line in lines]


def test_every_question_has_the_mt_bench_layout(questions):
    for q in questions:
        assert set(q) == {"question_id", "category", "turns", "source"}, q
        assert type(q["question_id"]) is int
        assert isinstance(q["category"], str) and q["category"]
        assert isinstance(q["turns"], list) and q["turns"]
        assert all(isinstance(t, str) and t.strip() for t in q["turns"]), q["question_id"]
        assert isinstance(q["source"], str) and ":" in q["source"], q["question_id"]
        assert len(q["turns"][0]) <= make_suite.MAX_PROMPT_CHARS, q["question_id"]


def test_ids_are_unique_and_grouped_by_category(questions):
    ids = [q["question_id"] for q in questions]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    order = list(dict.fromkeys(q["category"] for q in questions))
    assert order == list(make_suite.CATEGORIES)
    for q in questions:  # category k holds ids 100k+1 .. 100k+99
        assert q["question_id"] // 100 == order.index(q["category"]) + 1, q["question_id"]


def test_categories_turns_and_prompts(questions):
    counts = collections.Counter(q["category"] for q in questions)
    assert len(counts) >= 7
    assert min(counts.values()) >= 20, counts
    two_turn = collections.Counter(q["category"] for q in questions if len(q["turns"]) == 2)
    assert sum(two_turn.values()) >= len(questions) // 5
    assert two_turn["writing"] >= counts["writing"] // 4  # MT-Bench's follow-ups, in writing most
    firsts = [q["turns"][0] for q in questions]
    assert len(set(firsts)) == len(firsts), "a first turn appears twice"


def test_each_source_is_used_once_and_names_its_origin(questions):
    sources = [q["source"] for q in questions]
    assert len(set(sources)) == len(sources)
    origins = {s.split(":", 1)[0] for s in sources}
    assert origins == {"self_instruct", "gsm8k_train", "python-stdlib", "shakespeare"}
    by_category = collections.defaultdict(set)
    for q in questions:
        by_category[q["category"]].add(q["source"].split(":", 1)[0])
    assert by_category["math"] == {"gsm8k_train"}
    assert by_category["code"] == {"python-stdlib"}


def test_suite_sources_returns_every_source(questions, tmp_path):
    sources = make_suite.suite_sources(SUITE)
    assert sources == {q["source"] for q in questions}
    assert "gsm8k_train:0" in sources and "self_instruct:seed_task_4" in sources
    path = tmp_path / "two.jsonl"
    make_suite.write([{"question_id": 1, "category": "math", "turns": ["a"], "source": "x:1"},
                      {"question_id": 2, "category": "math", "turns": ["b"], "source": "y:2"}], path)
    assert make_suite.suite_sources(path) == {"x:1", "y:2"}


def test_rebuild_reproduces_the_committed_file(tmp_path, capsys):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared prompt data is not at {SHARED_DATA}")
    if sys.version_info[:2] != make_suite.PYTHON_VERSION:
        pytest.skip(f"the suite's stdlib prompts come from Python "
                    f"{'.'.join(map(str, make_suite.PYTHON_VERSION))}, this is {sys.version.split()[0]}")
    out = tmp_path / "questions.jsonl"
    assert make_suite.main(["--shared-data", str(SHARED_DATA), "--out", str(out)]) == 0
    assert out.read_bytes() == SUITE.read_bytes()
    assert "wrote" in capsys.readouterr().out
