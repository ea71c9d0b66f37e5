"""The generate command line (infer/generate.py): text out for every method, the same greedy tokens
whatever the method, and clear errors for bad input."""

import json

import jax
import pytest

from infer import bench
from infer import generate as cli
from specblock_jax import drafter as drafter_lib
from specblock_jax import drafter_io, hf, load_target
from specblock_jax.models import specblock
from specblock_jax.specblock_draft import SpecBlockMethod


@pytest.fixture(scope="module")
def target():
    return load_target(hf.TOY_TARGET_DIR)


@pytest.fixture(autouse=True)
def setup(tmp_path, monkeypatch, target):
    """No shipped drafter is visible (whatever assets hold); one target loaded for all tests."""
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(drafter_lib, "shipped_drafters_dir", lambda path: empty)
    monkeypatch.setattr(cli, "load_target", lambda path=None: target if path is None else load_target(path))


def test_every_method_gives_the_same_greedy_tokens(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):\\n    return a"}\n{"prompt": "ROMEO.\\nBut soft"}\n')
    rows = {}
    for method in ("ar", "ngram"):
        assert cli.main(["--prompt-file", str(prompts), "--method", method, "--max-new-tokens", "8", "--json"]) == 0
        captured = capsys.readouterr()
        rows[method] = [json.loads(line) for line in captured.out.splitlines()]
        stats = json.loads(captured.err.strip().splitlines()[-1])
        assert stats["method"] == method and stats["tokens_per_s"] > 0 and ("tau" in stats) == (method != "ar")
    assert [r["prompt"] for r in rows["ar"]] == ["def add(a, b):\n    return a", "ROMEO.\nBut soft"]
    assert all(len(r["token_ids"]) == 8 and isinstance(r["completion"], str) for r in rows["ar"])
    assert [r["token_ids"] for r in rows["ngram"]] == [r["token_ids"] for r in rows["ar"]]


def test_specblock_adapt_serves_the_prompts_in_turn_with_the_same_tokens(tmp_path, capsys, target):
    config = specblock.SpecBlockConfig.for_target(target.config, num_layers=1, rank_hidden=8)
    method = SpecBlockMethod(config, budget=4, max_blocks=1, widths=(1, 2, 2, 1), slot0_width=2)
    sb = drafter_io.save(method, specblock.init_params(config, jax.random.key(0)), tmp_path / "sb")
    args = ["--prompt", "def add(a, b):\n", "--prompt", "ROMEO.\n", "--max-new-tokens", "6", "--json"]
    rows = {}
    for extra in (["--method", "ar"], ["--method", "specblock+adapt", "--drafter", str(sb)]):
        assert cli.main(args + extra) == 0
        captured = capsys.readouterr()
        rows[extra[1]] = [json.loads(line)["token_ids"] for line in captured.out.splitlines()]
    assert rows["specblock+adapt"] == rows["ar"]
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["method"] == "specblock+adapt" and len(stats["tau"]) == 2 and stats["updates"] == 0


def test_text_output(capsys):
    assert cli.main(["--prompt", "import os\n", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os\n") and "-" * 60 in out


def test_trained_method_without_a_drafter_is_a_clear_error(capsys):
    assert cli.main(["--prompt", "x", "--method", "eagle3"]) == 2
    assert "need a trained drafter" in capsys.readouterr().err


def test_drafter_of_another_kind_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "drafter.json").write_text(json.dumps({"kind": "eagle3"}))
    assert cli.main(["--prompt", "x", "--method", "specblock", "--drafter", str(tmp_path)]) == 2
    assert "holds a eagle3 drafter, not specblock" in capsys.readouterr().err


def test_drafter_for_a_method_without_one_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--prompt", "x", "--method", "ngram", "--drafter", str(tmp_path)])
    assert e.value.code == 2 and "--drafter is for --method" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "holds no prompts"),
                                              ('{"text": "a"}\n', ":1: expected an object")])
def test_bad_prompt_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    assert cli.main(["--prompt-file", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_chat_needs_a_chat_template(capsys):
    assert cli.main(["--chat", "--prompt", "Hi!"]) == 2  # the toy target was trained without one
    assert "prompt 0: the target's tokenizer has no chat template" in capsys.readouterr().err
