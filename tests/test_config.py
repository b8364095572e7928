from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medistill.config import load_config
from medistill.errors import ConfigError


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.epochz" in str(e.value) and "unknown key" in str(e.value) and str(p) in str(e.value)


def test_wrong_type(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(p)


def test_overrides_are_data_not_code() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.05", "students.0.model=cnn5", "data.name=__import__('os')"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.students[0].model == "cnn5"
    assert cfg.data.name == "__import__('os')"  # stays a string, never evaluated


def test_yaml_tags_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("out: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_duplicate_participants_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, [], base={"students": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.epochs"])


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.yaml")


def test_example_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "example configs missing"
    for f in files:
        load_config(f)


def test_paper_recipes_validate() -> None:
    from medistill.config import _deep_merge
    from medistill.distill.methods import METHODS
    from medistill.distill.terms import TERMS
    from medistill.commands.recipe import load_recipe

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "papers").glob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        r = load_recipe(f)
        for st in r.stages:
            cfg = load_config(None, [], base=_deep_merge(r.defaults, st.config))
            assert all(t.type in TERMS for t in cfg.terms), f
            assert all(m in METHODS for m in st.methods or []), f


def test_recipe_runs_stages_in_order(tmp_path: Path) -> None:
    import yaml

    from conftest import write_npz
    from medistill.commands.recipe import run_recipe

    npz = write_npz(tmp_path / "d.npz")
    tiny = {"widths": [4, 4, 8, 8, 8]}
    recipe = {
        "description": "tiny", "out": str(tmp_path / "r"),
        "defaults": {"data": {"name": str(npz), "augment": "none"}, "train": {"epochs": 1, "latency": False, "progress": False}},
        "stages": [
            {"name": "teacher", "config": {"students": [{"name": "t", "model": "cnn5", "kwargs": tiny}]}},
            {"name": "students", "methods": ["kd", "dkd"], "config": {
                "teachers": [{"name": "t", "checkpoint": str(tmp_path / "r" / "teacher" / "run")}],
                "students": [{"name": "s", "model": "cnn5", "kwargs": tiny}]}},
        ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rows = run_recipe(tmp_path / "r.yaml")
    assert [r["method"] for r in rows["students"]] == ["kd", "dkd"]
    assert [r["method"] for r in rows["teacher"]] == ["ce"]  # no named method: the terms label the row
    assert "## students" in (tmp_path / "r" / "results.md").read_text()
    # a partial rerun keeps the other stages' tables; --seeds replaces a seeded stage's seeds only
    recipe["stages"][1]["seeds"] = [0]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rows = run_recipe(tmp_path / "r.yaml", only=["students"], seeds=[1])
    assert [r["run"] for r in rows["students"]] == ["kd_seed-1", "dkd_seed-1"]
    md = (tmp_path / "r" / "results.md").read_text()
    assert "## teacher" in md and "## students" in md
    with pytest.raises(ConfigError, match="no stage named"):
        run_recipe(tmp_path / "r.yaml", only=["studnets"])


def test_recipe_seeds_keep_the_teacher_stages_seeds() -> None:
    """``recipe --seeds 0``: UMKD's two experts (seeds 0 and 1) are the distill stage's two
    teachers, not repeated measurements — their stage keeps both seeds, the others take 0."""
    from medistill.commands.recipe import load_recipe, teacher_stages

    root = Path(__file__).resolve().parents[1] / "configs" / "papers"
    assert teacher_stages(load_recipe(root / "umkd_retinamnist_source.yaml")) == {"experts"}
    mt = load_recipe(root / "multiteacher_xarch_lc25000.yaml")
    assert teacher_stages(mt) and teacher_stages(mt) < {st.name for st in mt.stages}


def test_paper_recipe_models_build_at_their_sizes() -> None:
    """Every model a recipe trains (grid values included) is built at its input size: validation
    alone let a Visformer that refused 64 px through."""
    from medistill.config import _deep_merge
    from medistill.models import create_model
    from medistill.commands.recipe import load_recipe

    seen = set()
    for f in sorted((Path(__file__).resolve().parents[1] / "configs" / "papers").glob("*.yaml")):
        r = load_recipe(f)
        for st in r.stages:
            cfg = load_config(None, [], base=_deep_merge(r.defaults, st.config))
            names = [g.split("=", 1)[1].split(",") for g in st.grid or [] if g.startswith("students.0.model=")]
            for i, s in enumerate(cfg.students):
                size = s.input_size or (224 if "lc25000" in cfg.data.name else 28)
                for name in (names[0] if names and i == 0 else [s.model]):
                    if (name, size, s.small_input) in seen:
                        continue
                    seen.add((name, size, s.small_input))
                    m = create_model(name, 3, 3, size, small_input=s.small_input, **s.kwargs)
                    assert m.eval()(torch.zeros(1, 3, size, size)).shape == (1, 3), (f.name, name)
    assert len(seen) >= 6


def test_recipe_checkpoint_that_no_stage_makes_is_refused(tmp_path: Path) -> None:
    import yaml

    from medistill.commands.recipe import load_recipe

    recipe = {"out": "runs/r", "stages": [
        {"name": "experts", "seeds": [0, 1], "config": {"students": [{"name": "e", "model": "cnn5"}]}},
        {"name": "student", "config": {"teachers": [{"name": "e0", "checkpoint": "runs/r/experts/seed=0"}],
                                       "students": [{"name": "s", "model": "cnn5"}]}}]}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"'runs/r/experts/seed=0'.*runs/r/experts/seed-0, runs/r/experts/seed-1"):
        load_recipe(f)
    recipe["stages"][1]["config"]["teachers"][0]["checkpoint"] = "runs/r/experts/seed-1"
    f.write_text(yaml.safe_dump(recipe))
    assert len(load_recipe(f).stages) == 2


def test_on_off_words_survive_yaml_booleans() -> None:
    """``--set KEY=on/off`` (YAML booleans) means the word for fields that offer it."""
    c = load_config(None, ["train.amp=off", "train.teacher_cache=on", "train.compile=off", "data.resident=yes",
                           "students.0.small_input=off"])
    assert (c.train.amp, c.train.teacher_cache, c.train.compile, c.data.resident, c.students[0].small_input) == \
        ("off", "on", "off", "on", "off")
    assert load_config(None, ["train.teacher_cache=off"]).train.teacher_cache == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=on"])          # amp has no "on": still an error naming the key
