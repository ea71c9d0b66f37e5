"""The benchmark harness (infer/bench.py) end to end at micro scale on the toy target: the report's
schema, zero greedy mismatches for sound methods, a broken decoding path reported (not hidden), clear
errors for bad input, and a partial report when a run is cut short."""

import copy
import dataclasses
import json
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import pytest

from infer import bench, plots, timing
from specblock_jax import Drafter, chat, drafter_io, generate, hf, load_target, verify
from specblock_jax.eagle3_draft import Eagle3Method
from specblock_jax.models import eagle3, specblock
from specblock_jax.ngram import NgramMethod
from specblock_jax.specblock_draft import SpecBlockMethod

PROMPTS = ["def add(a, b):\n    return a", "ROMEO.\nBut soft, what light"]  # short: one compile per method
METHOD_KEYS = {"tau", "tokens_per_s", "speedup_vs_ar", "speedup_vs_ar_total", "draft_ms_per_iter",
               "verify_ms_per_iter", "other_ms_per_iter", "iteration_ms", "loop_ms_per_iter",
               "drafter_forwards_per_iter", "iterations", "verify_steps", "mismatches_vs_ar", "mismatched_prompts",
               "acceptance_histogram", "runs", "new_tokens", "prompts", "phase_ms", "max_tokens_per_iter",
               "speedup_ceiling", "tau_runs"}


@pytest.fixture(scope="module")
def target():
    return load_target(hf.TOY_TARGET_DIR)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Command-line options for a micro run: two short prompts, 8 new tokens."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ["--prompts", str(path), "--max-new-tokens", "8"]


@pytest.fixture(autouse=True)
def no_shipped_drafters(tmp_path, monkeypatch, target):
    """Tests see no shipped drafter (whatever assets/drafters holds) and share one loaded target."""
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(bench.drafter_lib, "shipped_drafters_dir", lambda path: empty)
    monkeypatch.setattr(bench, "load_target", lambda path=None: target if path is None else load_target(path))
    return empty


def save_untrained_eagle3(target_config, path, **overrides):
    config = eagle3.Eagle3Config.for_target(target_config, **overrides)
    method = Eagle3Method(config, budget=4, max_depth=2, topk=2)
    drafter_io.save(method, eagle3.init_params(config, jax.random.key(0)), path)
    return path


def read(path):
    return json.loads(pathlib.Path(path).read_text())


def test_acceptance_rate_counts_the_positions_each_step_tried():
    # depth 3; steps accepting 0, 1, 2 and 3 drafts: 4, 3, 2 and 1 of them
    rate, by_depth = bench.acceptance([0, 4, 3, 2, 1], 3)
    assert rate == pytest.approx((3 * 1 + 2 * 2 + 1 * 3) / (4 * 1 + 3 * 2 + 2 * 3 + 1 * 3))  # a full path tried 3
    assert by_depth == pytest.approx([6 / 10, 3 / 6, 1 / 3])
    rate, by_depth = bench.acceptance([0, 5], 4)  # nothing accepted: depths past the first were never tried
    assert rate == 0.0 and by_depth == [0.0, None, None, None]


def test_end_to_end_schema_and_no_mismatch(small, tmp_path, target, capsys):
    drafter_dir = save_untrained_eagle3(target.config, tmp_path / "e3")
    out = tmp_path / "results.json"
    rc = bench.main(small + ["--methods", "eagle3", "--drafter", f"eagle3={drafter_dir}", "--repeats", "2",
                             "--timing-calls", "2", "--out", str(out)])
    assert rc == 0
    report = read(out)
    assert report["complete"] is True and report["interrupted"] is None and report["warnings"] == []
    assert report["config"]["methods"] == ["ar", "eagle3"]
    assert report["config"]["tree"]["eagle3"]["budget"] == 4
    assert {"jax", "python", "device", "git_commit"} <= set(report["versions"]) and report["timing_method"]
    for name, m in report["methods"].items():
        assert METHOD_KEYS <= set(m), (name, METHOD_KEYS - set(m))
        assert m["runs"] == 2 * 2 and m["prompts"] == 2 and m["mismatches_vs_ar"] == 0, name
        assert m["tokens_per_s"] > 0 and m["iterations"] > 0 and m["iteration_ms"] > 0
        assert m["draft_ms_per_iter"] >= 0 and m["verify_ms_per_iter"] > 0
        assert m["loop_ms_per_iter"] > 0
        assert m["other_ms_per_iter"] == pytest.approx(m["loop_ms_per_iter"] - m["draft_ms_per_iter"]
                                                       - m["verify_ms_per_iter"])
        hist = m["acceptance_histogram"]
        assert m["tau"] == pytest.approx(sum(k * n for k, n in enumerate(hist)) / sum(hist))
        assert 1.0 <= m["tau"] <= 3.0  # a depth-2 tree commits at most 3 tokens per step
        per_run = m["tau_runs"]  # run order: repeat by repeat, the same prompts each
        assert len(per_run) == 4 and per_run[:2] == per_run[2:] and min(per_run) <= m["tau"] <= max(per_run)
        assert m["speedup_ceiling"] == pytest.approx(
            m["max_tokens_per_iter"] * report["methods"]["ar"]["iteration_ms"] / m["iteration_ms"])
    ar, e3 = report["methods"]["ar"], report["methods"]["eagle3"]
    assert ar["speedup_vs_ar"] == pytest.approx(1.0) and ar["speedup_vs_ar_total"] == pytest.approx(1.0)
    assert ar["tau"] == 1.0 and ar["draft_ms_per_iter"] == 0
    assert (ar["max_tokens_per_iter"], e3["max_tokens_per_iter"]) == (1, 3)  # depth 2 (budget 4): 2 drafts + bonus
    assert ar["speedup_ceiling"] == pytest.approx(1.0)
    assert ar["iterations"] == 2 * 7  # 8 tokens each, the first from the prefill (no EOS this early)
    assert e3["drafter_forwards_per_iter"] == pytest.approx(2.0)  # EAGLE drafting: max_depth forwards per step
    assert "acceptance_rate" not in ar
    assert (e3["acceptance_rate"], e3["acceptance_by_depth"]) == bench.acceptance(e3["acceptance_histogram"], 2)
    assert set(e3["phase_ms"]) == {"draft_ms", "verify_ms", "root_ms", "loop_ms", "loop_iterations",
                                   "loop_verify_steps"}
    assert e3["phase_ms"]["loop_iterations"] == e3["iterations"] // 2  # the first prompt's loop, timed apart
    stdout = capsys.readouterr().out
    assert "| eagle3 |" in stdout and "WARNING" not in stdout
    for suffix in ("speedup_tau", "time_breakdown", "acceptance"):
        png = tmp_path / f"results_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", suffix


def test_specblock_adapt_runs_beside_specblock_and_stays_lossless(small, tmp_path, target, capsys):
    """`specblock+adapt` takes the specblock drafter directory, restarts from it at every repeat, has no
    phase timing (its loop collects feedback) and matches ar's greedy output."""
    config = specblock.SpecBlockConfig.for_target(target.config, num_layers=1, rank_hidden=8)
    method = SpecBlockMethod(config, budget=4, max_blocks=1, widths=(1, 2, 2, 1), slot0_width=2)
    drafter_dir = drafter_io.save(method, specblock.init_params(config, jax.random.key(0)), tmp_path / "sb")
    out = tmp_path / "results.json"
    rc = bench.main(small + ["--methods", "specblock,specblock+adapt", "--drafter", f"specblock={drafter_dir}",
                             "--repeats", "2", "--timing-calls", "2", "--out", str(out), "--plots-dir", "none"])
    assert rc == 0
    report = read(out)
    assert report["config"]["methods"] == ["ar", "specblock", "specblock+adapt"]
    sb, adapting = report["methods"]["specblock"], report["methods"]["specblock+adapt"]
    assert adapting["runs"] == 4 and adapting["mismatches_vs_ar"] == 0 and sb["mismatches_vs_ar"] == 0
    assert adapting["acceptance_histogram"] == sb["acceptance_histogram"]  # no update this short: same drafts
    assert adapting["phase_ms"] is None and sb["phase_ms"] is not None
    windows = adapting["adaptation"]  # every run is a window of its adapter, restarted at each repeat
    assert windows["windows"] == 4 and windows["updates"] == windows["kept"] == 0 and "adaptation" not in sb
    assert 0 < windows["adapt_time_share"] < 1
    assert "specblock+adapt: 4 windows, 0 updates tried (0 kept)" in capsys.readouterr().out
    assert bench.parse_drafter_specs([f"specblock+adapt={drafter_dir}"]) == {"specblock": drafter_dir}


class CorruptingNgram(NgramMethod):
    """An n-gram drafter of its own class: its decoding loop is traced apart from the real one's, so the
    test can break acceptance for it alone."""


def test_broken_decoding_is_reported_not_hidden(small, tmp_path, target, monkeypatch, capsys):
    real_accept = verify.accept

    def accept_wrong_bonus(tree, logits, sampling, key, max_depth):
        """A bug in the decoding path: the bonus token is replaced by the next id."""
        acc = real_accept(tree, logits, sampling, key, max_depth)
        bonus_B = (acc.bonus_B + 1) % target.config.vocab_size
        at_bonus_BxD1 = jnp.arange(acc.tokens_BxD1.shape[1]) == acc.length_B[:, None]
        return acc._replace(bonus_B=bonus_B, tokens_BxD1=jnp.where(at_bonus_BxD1, bonus_B[:, None], acc.tokens_BxD1))

    monkeypatch.setattr(verify, "accept", accept_wrong_bonus)
    monkeypatch.setattr(bench, "load_drafter", lambda kind, t: Drafter(CorruptingNgram()))
    out = tmp_path / "results.json"
    rc = bench.main(small + ["--methods", "ngram", "--repeats", "1", "--timing-calls", "0", "--plots-dir", "none",
                             "--out", str(out)])
    assert rc == 1
    report = read(out)
    assert report["complete"] is True
    ngram = report["methods"]["ngram"]
    assert ngram["mismatches_vs_ar"] == 2
    assert [(m["question_id"], m["turn"]) for m in ngram["mismatched_prompts"]] == [(0, 1), (1, 1)]
    for m in ngram["mismatched_prompts"]:  # where it first differs, and the target's logit gap there: no near-tie
        assert m["token"] == (m["ar_token"] + 1) % target.config.vocab_size
        assert m["logit_gap"] > 0.1 and m["logit_gap"] >= m["top2_margin"] > 0
    assert report["methods"]["ar"]["mismatches_vs_ar"] == 0
    assert len(report["warnings"]) == 1 and "ngram: 2 of 2 answers differ" in report["warnings"][0]
    stdout = capsys.readouterr().out
    assert "WARNING: ngram: 2 of 2 answers differ from ar's greedy output (questions 0 turn 1 (logit gap" in stdout


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_partial_run_writes_what_it_measured(small, tmp_path, monkeypatch, interrupt):
    calls = []
    real_generate = bench.generate

    def generate_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 + 4 + 1:  # warm-up (2 methods), repeat 0 (2 prompts x 2 methods), then one more
            raise interrupt("stopped by the test")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(bench, "generate", generate_then_fail)
    out = tmp_path / "results.json"
    rc = bench.main(small + ["--methods", "ngram", "--repeats", "3", "--out", str(out)])
    assert rc == (130 if interrupt is KeyboardInterrupt else 1)
    report = read(out)
    assert report["complete"] is False and report["interrupted"].startswith(interrupt.__name__)
    assert report["methods"]["ar"]["runs"] == 2 and report["methods"]["ngram"]["runs"] == 2
    assert report["methods"]["ngram"]["mismatches_vs_ar"] == 0 and report["methods"]["ngram"]["tokens_per_s"] > 0
    assert report["methods"]["ngram"]["draft_ms_per_iter"] is None  # phases are timed after the repeats


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("make_file, message", [
    (lambda tmp: str(tmp / "nope.jsonl"), "does not exist"),
    (lambda tmp: write_lines(tmp / "empty.jsonl", []), "holds no prompts"),
    (lambda tmp: write_lines(tmp / "bad.jsonl", ['{"prompt": "a"}', '{"text": "b"}']),
     "bad.jsonl:2: expected an object"),
])
def test_bad_prompt_file_is_a_clear_error(tmp_path, capsys, make_file, message):
    rc = bench.main(["--prompts", make_file(tmp_path), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--methods", "ar,medusa"])
    assert e.value.code == 2 and "unknown method(s) ['medusa']" in capsys.readouterr().err


def test_trained_method_without_drafter_is_a_clear_error(capsys):
    assert bench.main(["--methods", "specblock"]) == 2
    assert "need a trained drafter" in capsys.readouterr().err


def test_drafter_that_does_not_match_the_target_is_a_clear_error(small, tmp_path, target, capsys):
    narrow = dataclasses.replace(target.config, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=64)
    drafter_dir = save_untrained_eagle3(narrow, tmp_path / "e3-narrow")
    assert bench.main(small + ["--drafter", str(drafter_dir), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "eagle3 drafter" in err and "hidden_size 64 does not match the target's 256" in err
    assert not (tmp_path / "r.json").exists()


def test_drafter_specs(tmp_path, no_shipped_drafters):
    e3 = tmp_path / "e3"
    e3.mkdir()
    (e3 / "drafter.json").write_text(json.dumps({"kind": "eagle3"}))
    assert bench.parse_drafter_specs([str(e3)]) == {"eagle3": e3}
    assert bench.parse_drafter_specs([f"eagle3={e3}"]) == {"eagle3": e3}
    with pytest.raises(ValueError, match="holds a eagle3 drafter, not specblock"):
        bench.parse_drafter_specs([f"specblock={e3}"])
    with pytest.raises(ValueError, match="given twice for eagle3"):
        bench.parse_drafter_specs([str(e3), f"eagle3={e3}"])
    with pytest.raises(ValueError, match="takes no drafter directory"):
        bench.parse_drafter_specs([f"ngram={e3}"])
    with pytest.raises(FileNotFoundError, match="not a trained drafter directory"):
        bench.parse_drafter_specs([str(tmp_path)])
    # Default methods: every one whose drafter is given or shipped for the target.
    assert bench.select_methods(None, {}, shipped_dir=no_shipped_drafters) == ["ar", "ngram"]
    assert bench.select_methods(None, {"eagle3": e3}, shipped_dir=None) == ["ar", "ngram", "eagle3"]
    (no_shipped_drafters / "specblock").mkdir()
    assert bench.select_methods(None, {}, shipped_dir=no_shipped_drafters) == ["ar", "ngram", "specblock"]
    assert bench.select_methods(None, {}, shipped_dir=None) == ["ar", "ngram"]
    assert bench.select_methods(["specblock"], {}, shipped_dir=no_shipped_drafters) == ["ar", "specblock"]
    with pytest.raises(ValueError, match="not among --methods"):
        bench.select_methods(["ngram"], {"eagle3": e3}, shipped_dir=no_shipped_drafters)
    # Variants: KIND:LABEL, each with its own directory of that kind.
    variants = bench.parse_drafter_specs([f"eagle3={e3}", f"eagle3:deep={e3}"])
    assert variants == {"eagle3": e3, "eagle3:deep": e3} and bench.kind_of("eagle3:deep") == "eagle3"
    assert bench.select_methods(None, variants, shipped_dir=None) == ["ar", "ngram", "eagle3", "eagle3:deep"]
    assert bench.select_methods(["eagle3:deep"], {"eagle3:deep": e3}, shipped_dir=None) == ["ar", "eagle3:deep"]
    with pytest.raises(ValueError, match="need a trained drafter"):
        bench.select_methods(["eagle3:wide"], variants, shipped_dir=None)
    with pytest.raises(ValueError, match="holds a eagle3 drafter, not specblock"):
        bench.parse_drafter_specs([f"specblock:x={e3}"])
    for bad in (f"ngram:x={e3}", f"eagle3:={e3}", f"eagle3:a b={e3}"):
        with pytest.raises(ValueError, match="a variant is KIND:LABEL"):
            bench.parse_drafter_specs([bad])


def test_variants_of_one_kind_run_side_by_side_with_their_own_trees(small, tmp_path, target):
    """Two EAGLE-3 drafter directories as eagle3 and eagle3:wide, and the narrow one again as eagle3:deep
    with a tree of its own: --tree JSON sets fields of every tree, METHOD=JSON of one method's."""
    narrow = save_untrained_eagle3(target.config, tmp_path / "narrow")
    wide = tmp_path / "wide"
    config = eagle3.Eagle3Config.for_target(target.config)
    drafter_io.save(Eagle3Method(config, budget=6, max_depth=3, topk=3),
                    eagle3.init_params(config, jax.random.key(1)), wide)
    out = tmp_path / "r.json"
    rc = bench.main(small + ["--methods", "eagle3,eagle3:wide,eagle3:deep", "--drafter", f"eagle3={narrow}",
                             "--drafter", f"eagle3:wide={wide}", "--drafter", f"eagle3:deep={narrow}",
                             "--tree", '{"topk": 1}', "--tree", 'eagle3:deep={"max_depth": 4, "budget": 5}',
                             "--repeats", "1", "--timing-calls", "0", "--plots-dir", "none", "--out", str(out)])
    assert rc == 0
    report = read(out)
    assert report["config"]["methods"] == ["ar", "eagle3", "eagle3:wide", "eagle3:deep"]
    trees = report["config"]["tree"]
    assert (trees["eagle3"]["budget"], trees["eagle3"]["max_depth"], trees["eagle3"]["topk"]) == (4, 2, 1)
    assert (trees["eagle3:wide"]["budget"], trees["eagle3:wide"]["topk"]) == (6, 1)
    assert (trees["eagle3:deep"]["budget"], trees["eagle3:deep"]["max_depth"], trees["eagle3:deep"]["topk"]) == (5, 4, 1)
    assert report["config"]["drafters"]["eagle3:wide"] == str(wide)
    assert bench.main(small + ["--tree", 'eagle3:x={"topk": 1}', "--out", str(tmp_path / "bad.json")]) == 2
    for name in ("eagle3", "eagle3:wide", "eagle3:deep"):
        assert report["methods"][name]["mismatches_vs_ar"] == 0
        assert report["methods"][name]["max_tokens_per_iter"] == trees[name]["max_depth"] + 1


def test_phase_breakdown_weights_verify_by_step_kind():
    phases = {"draft_ms": 1.0, "verify_ms": 4.0, "root_ms": 2.0, "loop_ms": 6.0, "loop_iterations": 10,
              "loop_verify_steps": 5}
    got = timing.phase_breakdown(phases)
    assert got == {"loop_ms_per_iter": 6.0, "draft_ms_per_iter": 1.0, "verify_ms_per_iter": 3.0,
                   "other_ms_per_iter": 2.0}
    plain = {"root_ms": 2.0, "loop_ms": 2.5, "loop_iterations": 10, "loop_verify_steps": 10}
    assert timing.phase_breakdown(plain)["other_ms_per_iter"] == pytest.approx(0.5)


def test_plots_of_a_partial_report(tmp_path):
    report = {"config": {}, "versions": {}, "methods": {
        "ar": {"runs": 1, "speedup_vs_ar": 1.0, "tau": 1.0, "iteration_ms": 1.0, "loop_ms_per_iter": None,
               "draft_ms_per_iter": None,
               "verify_ms_per_iter": None, "other_ms_per_iter": None, "acceptance_histogram": [0, 5]},
        "ngram": {"runs": 0}}}
    paths = plots.write_plots(report, tmp_path / "sub" / "r")
    assert [p.name for p in paths] == ["r_speedup_tau.png", "r_time_breakdown.png", "r_acceptance.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_default_prompts_are_the_suite_per_category():
    questions, source = bench.load_questions(bench.parse_args(["--max-prompts", "2"]))
    suite = chat.read_questions(bench.SUITE)
    categories = list(dict.fromkeys(q["category"] for q in suite))
    assert len(categories) >= 6 and "suite" in source
    assert [q["question_id"] for q in questions] == [q["question_id"] for c in categories
                                                     for q in [q for q in suite if q["category"] == c][:2]]
    assert all(q["chat"] for q in questions)
    picked, _ = bench.load_questions(bench.parse_args(["--categories", "math,code"]))
    assert {q["category"] for q in picked} == {"math", "code"} and len(picked) >= 40
    with pytest.raises(ValueError, match="--categories: poetry not in .*questions.jsonl; it has writing"):
        bench.load_questions(bench.parse_args(["--categories", "poetry"]))


def test_multi_turn_questions_answer_in_turn_with_figures_per_category(tmp_path, target, monkeypatch, capsys):
    """Turn 2's prompt is the conversation with each method's own turn-1 answer; figures per category;
    the report holds ar's answers, which --show-answers prints."""
    tokenizer = copy.deepcopy(target.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    templated = dataclasses.replace(target, tokenizer=tokenizer)
    monkeypatch.setattr(bench, "load_target", lambda path=None: templated)
    seen = []

    def recording_generate(t, prompts, **kwargs):
        seen.append((kwargs["drafter"] is not None, prompts))
        return generate(t, prompts, **kwargs)

    monkeypatch.setattr(bench, "generate", recording_generate)
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 7, "category": "code", "turns": ["def add(a, b):", "def sub(a, b):"]},
        {"question_id": 8, "category": "prose", "turns": ["ROMEO."]}]) + "\n")
    out = tmp_path / "r.json"
    assert bench.main(["--prompts", str(path), "--methods", "ngram", "--max-new-tokens", "6", "--timing-calls", "0",
                       "--plots-dir", "none", "--out", str(out), "--show-answers"]) == 0
    report = read(out)
    assert report["config"]["num_questions"] == 2 and report["config"]["num_turns"] == 3
    ar_turns = [p[0] for spec, p in seen[2:] if not spec]
    assert [(a["question_id"], a["turn"], a["prompt"]) for a in report["answers"]] == [
        (7, 1, "def add(a, b):"), (7, 2, "def sub(a, b):"), (8, 1, "ROMEO.")]
    assert report["answers"][0]["answer"] == ar_turns[1][1]["content"]  # what turn 2's conversation carried
    for method in ("ar", "ngram"):
        turns = [p[0] for spec, p in seen[2:] if spec == (method == "ngram")]  # after the warm-up
        assert [m["content"] for m in turns[0]] == ["def add(a, b):"]
        assert [m["role"] for m in turns[1]] == ["user", "assistant", "user"]
        assert turns[1][1]["content"] and turns[1][2]["content"] == "def sub(a, b):"
    assert set(report["categories"]) == {"code", "prose"}
    assert report["categories"]["code"]["ar"]["prompts"] == 2 and report["categories"]["prose"]["ngram"]["prompts"] == 1
    assert report["methods"]["ngram"]["prompts"] == 3 and report["methods"]["ngram"]["mismatches_vs_ar"] == 0
    stdout = capsys.readouterr().out
    assert "| category | answers | ar tokens/s | ngram tokens/s | ngram speedup | ngram tau |" in stdout
    assert "| prose | 1 |" in stdout
    shown = stdout.index("=== code, question 7, turn 2 ===\n  > def sub(a, b):\n--- ar's answer ---\n")
    assert shown < stdout.index("| category |")  # the answers come before the table
    assert textwrap.indent(report["answers"][1]["answer"], "  ") in stdout


def test_a_question_line_without_turns_is_an_error_before_compute(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "turns": ["Hi?"]}) + "\n" + json.dumps({"question_id": 2}) + "\n")
    assert bench.main(["--prompts", str(path), "--out", str(tmp_path / "r.json")]) == 2
    assert "q.jsonl:2: a question needs 'turns'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_tree_overrides_apply_where_the_method_has_the_field(capsys):
    args = bench.parse_args(["--tree-budget", "3", "--max-depth", "2", "--topk", "5"])
    ngram = bench.with_tree(Drafter(NgramMethod()), args).method
    assert (ngram.budget, ngram.max_depth) == (3, 2)
    assert "tree field topk does not apply to NgramMethod" in capsys.readouterr().err
    args = bench.parse_args(["--tree", '{"max_depth": 4, "budget": 5}', "--tree", 'ngram={"max_depth": 6}',
                             "--tree-budget", "3"])
    assert (bench.with_tree(Drafter(NgramMethod()), args).method.max_depth,
            bench.with_tree(Drafter(NgramMethod()), args, "ngram").method.max_depth) == (4, 6)
    assert bench.with_tree(Drafter(NgramMethod()), args).method.budget == 3  # --tree-budget wins over --tree
    for bad in ("[1, 2]", "medusa={}", 'ngram={"a":', "ngram"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--tree", bad])
