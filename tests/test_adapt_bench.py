"""The domain-shift benchmark (infer/adapt_bench.py) at micro scale: the report per stream, per method
and per prompt, the plot, no mismatch between adapting and static outputs, and clear errors."""

import json

import jax
import pytest

from infer import adapt_bench
from specblock_jax import drafter_io, hf, load_target
from specblock_jax.data import Document
from specblock_jax.eagle3_draft import Eagle3Method
from specblock_jax.models import eagle3, specblock
from specblock_jax.specblock_draft import SpecBlockMethod


@pytest.fixture(scope="module")
def target():
    return load_target(hf.TOY_TARGET_DIR)


@pytest.fixture(autouse=True)
def one_target(monkeypatch, target):
    monkeypatch.setattr(adapt_bench, "load_target", lambda path=None: target)


def test_micro_run_reports_every_stream_and_prompt(tmp_path, target, capsys):
    config = specblock.SpecBlockConfig.for_target(target.config, num_layers=1, rank_hidden=8)
    method = SpecBlockMethod(config, budget=4, max_blocks=1, widths=(1, 2, 2, 1), slot0_width=2)
    sb = drafter_io.save(method, specblock.init_params(config, jax.random.key(0)), tmp_path / "sb")
    out = tmp_path / "adapt.json"
    rc = adapt_bench.main(["--drafter", str(sb), "--streams", "code,prose+code", "--max-prompts", "2",
                           "--max-new-tokens", "8", "--adapt", '{"min_records": 1, "horizon_tokens": 100000}',
                           "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["config"]["adapt_config"]["min_records"] == 1
    assert set(report["streams"]) == {"code", "prose+code"}
    mixed = report["streams"]["prose+code"]
    assert mixed["prompts"] == 4 and len(mixed["passes"]) == 1
    assert mixed["horizon_tokens"] == 100000  # set; by default the stream's 4 x 8 tokens, which no update pays for
    records = mixed["passes"][0]["records"]
    assert [r["prompt"] for r in records["adapt"]] == [0, 1, 2, 3] == [r["prompt"] for r in records["static"]]
    assert records["adapt"][0]["updated"] is False  # nothing older to train on yet
    assert any(r["updated"] for r in records["adapt"])  # min_records 1: later windows try updates
    for r in records["adapt"]:  # an update's measured gain comes with its standard error, for the keep rule
        assert (r["measured_stderr"] is None) == (r["measured_gain"] is None) != r["updated"]
    summary = mixed["summary"]
    assert summary["mismatches"] == 0 and summary["speedup_adapt_vs_static"] > 0
    assert summary["adapt"]["updates"] == sum(r["updated"] for r in records["adapt"])
    assert 0 < summary["adapt"]["adapt_time_share"] < 1
    prices = summary["adapt"]["prices"][0]  # measured on this target, not constants
    assert prices["step_s"] > 0 and prices["cost_s"] > 0 and prices["cost_slope"] >= 0
    assert prices["step_s"] == records["adapt"][-1]["step_s"] != records["adapt"][1]["step_s"]
    assert "| prose+code |" in capsys.readouterr().out
    assert (tmp_path / "adapt_adaptation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_clear_error(tmp_path, target, capsys):
    e3_config = eagle3.Eagle3Config.for_target(target.config)
    e3 = drafter_io.save(Eagle3Method(e3_config, budget=4, max_depth=2, topk=2),
                         eagle3.init_params(e3_config, jax.random.key(0)), tmp_path / "e3")
    assert adapt_bench.main(["--drafter", str(e3), "--out", str(tmp_path / "r.json")]) == 2
    assert "not a SpecBlock drafter" in capsys.readouterr().err
    for argv, message in ((["--streams", "code+maths"], "unknown domain"),
                          (["--adapt", '{"params": "everything"}'], "params"),
                          (["--adapt", "[1]"], "not a JSON object"),
                          (["--repeats", "0"], "--repeats must be >= 1")):
        with pytest.raises(SystemExit):
            adapt_bench.main(["--drafter", "specblock"] + argv)
        assert message in capsys.readouterr().err


def test_corpus_streams_come_from_the_held_out_documents(monkeypatch, capsys):
    """--source corpus cuts each domain's prompts from the test split, domain after domain; a corpus too
    small for --max-prompts is a clear error."""
    def docs(domain, split):
        return [Document(domain, f"{split}.txt", "\n".join(f"{domain} {split} line {i:03d}" for i in range(300)))]

    splits = {d: {s: docs(d, s) for s in ("train", "validation", "test")} for d in ("code", "prose")}
    monkeypatch.setattr(adapt_bench.data, "corpus_splits", lambda: splits)
    prompts = adapt_bench.stream_prompts("prose+code", 3, "corpus")
    assert len(prompts) == 6 and len(set(prompts)) == 6
    assert all(p.startswith("prose test") for p in prompts[:3]) and all(p.startswith("code test") for p in prompts[3:])
    assert adapt_bench.main(["--drafter", "specblock", "--source", "corpus", "--max-prompts", "1000"]) == 2
    assert "fewer than 1000" in capsys.readouterr().err


def test_chat_prompt_files_give_streams_of_their_categories(tmp_path, capsys):
    """A chat prompt file's categories are the domains: a stream takes up to --max-prompts of each, in
    file order, as conversations; a domain it lacks, or a line without a category, is a clear error."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{c} {i}"}], "category": c, "source": f"s{c}{i}"}
            for i in range(3) for c in ("math", "writing")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = adapt_bench.stream_prompts("writing+math", 2, str(path))
    assert [p[0]["content"] for p in prompts] == ["writing 0", "writing 1", "math 0", "math 1"]
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in prompts)
    assert adapt_bench.main(["--drafter", "specblock", "--source", str(path), "--streams", "math,code",
                             "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "names ['code'], not categories of" in err and "(math, writing)" in err
    path.write_text(json.dumps({"messages": rows[0]["messages"]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: expected an object with 'category' and 'messages'"):
        adapt_bench.stream_prompts("math", 2, str(path))
