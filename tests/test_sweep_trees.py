"""The tree sweep (infer/sweep_trees.py) on the toy target: it benchmarks every tree of the grid beside
plain decoding, ranks them by speedup, and writes the fastest as the drafter's default."""

import json
import shutil

import pytest

from infer import sweep_trees
from specblock_jax import drafter_io, hf, load_drafter, load_target
from specblock_jax.config import ConfigError

TOY_EAGLE3 = hf.TOY_TARGET_DIR.parent / "drafters" / "eagle3"
GRID = {"chain2": {"budget": 2, "max_depth": 2, "topk": 1}, "4-2-2": {"budget": 4, "max_depth": 2, "topk": 2}}


@pytest.fixture
def drafter_dir(tmp_path):
    return shutil.copytree(TOY_EAGLE3, tmp_path / "eagle3")


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


def run(drafter_dir, grid_file, tmp_path, *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return a"}) + "\n")
    return sweep_trees.main(["--drafter", str(drafter_dir), "--grid", str(grid_file), "--target",
                             str(hf.TOY_TARGET_DIR), "--prompts", str(prompts), "--max-new-tokens", "8",
                             "--timing-calls", "0", "--plots-dir", "none", "--out", str(tmp_path / "r.json"), *extra])


def test_sweep_ranks_the_grid_and_writes_the_fastest_tree_as_default(drafter_dir, grid_file, tmp_path, capsys):
    weights = (drafter_dir / drafter_io.WEIGHTS).read_bytes()
    assert run(drafter_dir, grid_file, tmp_path, "--write-default") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["methods"] == ["ar", "eagle3:chain2", "eagle3:4-2-2"]
    for label, tree in GRID.items():  # each variant ran with its own tree
        assert {k: report["config"]["tree"][f"eagle3:{label}"][k] for k in tree} == tree
    speedups = {label: report["methods"][f"eagle3:{label}"]["speedup_vs_ar"] for label in GRID}
    best = max(speedups, key=speedups.get)
    decoding = json.loads((drafter_dir / drafter_io.DRAFTER_JSON).read_text())["decoding"]
    assert {k: decoding[k] for k in GRID[best]} == GRID[best]
    assert (drafter_dir / drafter_io.WEIGHTS).read_bytes() == weights
    method = load_drafter(str(drafter_dir), load_target(hf.TOY_TARGET_DIR)).method
    assert (method.budget, method.max_depth, method.topk) == tuple(GRID[best].values())
    assert f"default tree is now {best}" in capsys.readouterr().out


def test_without_write_default_the_drafter_is_untouched(drafter_dir, grid_file, tmp_path):
    before = (drafter_dir / drafter_io.DRAFTER_JSON).read_text()
    assert run(drafter_dir, grid_file, tmp_path) == 0
    assert (drafter_dir / drafter_io.DRAFTER_JSON).read_text() == before


@pytest.mark.parametrize("grid, message", [
    ({"deep": {"max_depth": 2, "widths": [1, 2]}}, "unknown key"),  # a SpecBlock field on an EAGLE-3 drafter
    ({"bad": {"budget": 0}}, "budget"),
    ({"a:b": {"budget": 2}}, "labels"),
    ([], "non-empty JSON object"),
])
def test_a_bad_grid_is_refused_before_any_compute(drafter_dir, tmp_path, grid, message, capsys):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    assert run(drafter_dir, path, tmp_path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_directory_without_drafter_json_and_sweep_owned_flags_are_refused(tmp_path, grid_file, capsys):
    assert run(tmp_path, grid_file, tmp_path) == 2
    assert "not a trained drafter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_trees.main(["--drafter", str(TOY_EAGLE3), "--methods", "ar"])


def test_set_decoding_checks_the_tree_and_leaves_the_file_alone_on_error(drafter_dir):
    before = (drafter_dir / drafter_io.DRAFTER_JSON).read_text()
    with pytest.raises(ConfigError, match="unknown key"):
        drafter_io.set_decoding(drafter_dir, {"expand": 2})
    assert (drafter_dir / drafter_io.DRAFTER_JSON).read_text() == before
    assert drafter_io.set_decoding(drafter_dir, {"budget": 5})["budget"] == 5


@pytest.mark.parametrize("kind", sorted(sweep_trees.GRIDS))
def test_every_built_in_tree_is_a_valid_method_for_the_shipped_toy_drafter(kind):
    """A built-in grid entry that its method rejects would only fail mid-sweep, after the others ran."""
    target = load_target(hf.TOY_TARGET_DIR)
    method = load_drafter(kind, target).method
    for label, tree in sweep_trees.GRIDS[kind].items():
        made = drafter_io.make_method(kind, method.config, tree)
        assert drafter_io.decoding_of(made)["budget"] == tree["budget"], label
