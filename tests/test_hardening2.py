"""Hardening, second round: nothing a user made is lost, leaks found by content, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CNN, run_engine, tiny_cfg, write_npz
from medistill.errors import ArgumentError, ConfigError, DataError


def test_out_with_the_users_own_files_is_refused_unless_forced(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("my own numbers")
    (out / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds other files"):
        run_engine(tiny_cfg(data_dir / "tiny.npz", out, epochs=1))
    assert (out / "metrics.json").read_text() == "my own numbers"
    from medistill.config import load_config
    from medistill.distill.engine import Engine

    Engine(load_config(None, [], base=tiny_cfg(data_dir / "tiny.npz", out, epochs=1)), force=True).run()
    assert (out / "notes.txt").read_text() == "x" and (out / "summary.json").is_file()


def test_duplicates_across_splits_are_found_by_content(tmp_path: Path) -> None:
    from medistill.config import DataConfig
    from medistill.data import build_data

    npz = write_npz(tmp_path / "d.npz")
    arr = dict(np.load(npz))
    arr["test_images"][:3] = arr["train_images"][:3]          # three test images copy training images
    arr["test_labels"][:3] = arr["train_labels"][:3]
    np.savez(tmp_path / "dup.npz", **arr)
    b = build_data(DataConfig(name=str(tmp_path / "dup.npz")))
    assert any("copies across splits: 3 test copies train" in n for n in b.split_record()["notes"])
    with pytest.raises(DataError, match="data.duplicates=warn"):
        build_data(DataConfig(name=str(tmp_path / "dup.npz"), duplicates="error"))
    # image files: byte-identical copies
    root = tmp_path / "folder"
    for split in ("train", "test", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test", "val"):
        for c in ("a", "b"):
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    shutil.copy(root / "train" / "a" / "0.png", root / "test" / "a" / "9.png")
    assert any("1 test copies train" in n for n in build_data(DataConfig(name=str(root))).split_notes)


def test_teacher_trained_on_the_students_test_images_is_flagged(data_dir: Path, tmp_path: Path) -> None:
    # a folder without a split of its own: each run's split seed decides its split
    folder = tmp_path / "pool"
    for c in range(3):
        (folder / str(c)).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for c in range(3):
        for i in range(12):
            im = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            im[c * 5:(c + 1) * 5] = 220
            Image.fromarray(im).save(folder / str(c) / f"{i}.png")
    t = tiny_cfg(folder, tmp_path / "t", epochs=1)
    t["data"]["split_seed"] = 1
    t["students"] = [{"name": "t", "model": "cnn5", "kwargs": TINY_CNN}]
    run_engine(t)
    s = tiny_cfg(folder, tmp_path / "s", epochs=1)
    s["data"]["split_seed"] = 2
    s["teachers"] = [{"name": "teacher", "checkpoint": str(tmp_path / "t")}]
    s["terms"] = [{"type": "ce"}, {"type": "kd"}]
    run_engine(s)
    n = json.loads((tmp_path / "s" / "run_info.json").read_text())["teachers"]["teacher"]["trained_on_test_images"]
    t_train = set(json.loads((tmp_path / "t" / "split.json").read_text())["train"])
    s_test = set(json.loads((tmp_path / "s" / "split.json").read_text())["test"])
    assert n == len(t_train & s_test) > 0
    assert "optimistic" in (tmp_path / "s" / "summary.md").read_text()


def test_external_validation_cannot_use_the_training_data(teachers: list[Path]) -> None:
    from medistill.commands.evaluate import evaluate_target

    data = json.loads((teachers[0] / "split.json").read_text())["source"]
    with pytest.raises(ConfigError, match="is the data .* was trained on"):
        evaluate_target(teachers[0], data=data, split="all", latency=False)


def test_external_results_of_same_named_folders_do_not_collide(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.commands.evaluate import evaluate_target

    run = tmp_path / "run"
    shutil.copytree(teachers[0], run)
    for site, seed in (("siteA", 3), ("siteB", 4)):
        (tmp_path / site).mkdir()
        write_npz(tmp_path / site / "images.npz", seed=seed)
        evaluate_target(run, data=str(tmp_path / site / "images.npz"), split="all", latency=False)
    dests = sorted((run / "students" / "t" / "external").iterdir())
    assert len(dests) == 2 and all(d.name.startswith("images-") for d in dests)


def test_predict_and_export_respect_the_named_files(teachers: list[Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from medistill.commands.deploy import export_model, predict_files

    run = tmp_path / "run"
    shutil.copytree(teachers[0], run)
    d = run / "students" / "t"
    sd = load_file(str(d / "model.safetensors"))
    save_file({k: (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in sd.items()}, str(d / "zeros.safetensors"))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((16, 16, 3), 90 if sub == "a" else 200, np.uint8)).save(tmp_path / sub / "x.png")
    imgs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]
    own = predict_files(d / "model.safetensors", imgs, cam=True, out_dir=tmp_path / "cams")
    zero = predict_files(d / "zeros.safetensors", imgs)
    assert zero[0]["probabilities"] != own[0]["probabilities"]      # the named weights were used
    assert len({r["cam"] for r in own}) == 2 and all(Path(r["cam"]).is_file() for r in own)
    (tmp_path / "exp").mkdir()
    r = export_model(d / "zeros.safetensors", out=tmp_path / "exp")
    assert Path(r["path"]) == tmp_path / "exp" / "model.onnx"


def test_explain_without_students_is_an_error(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.explain.run import explain_run

    run = tmp_path / "run"
    shutil.copytree(teachers[0], run)
    shutil.rmtree(run / "students")
    with pytest.raises(ArgumentError, match="no students"):
        explain_run(run, 2, None, ["gradcam"])


# --- one error boundary for everything a user can hand in ---------------------------------------

def test_unreadable_inputs_name_the_file(tmp_path: Path) -> None:
    from medistill.data.sources import open_source
    from medistill.commands.deploy import predict_files
    from medistill.errors import ModelError

    npz = write_npz(tmp_path / "d.npz")
    (tmp_path / "trunc.npz").write_bytes(npz.read_bytes()[:500])
    (tmp_path / "text.npz").write_text("hello")
    for name, words in (("trunc.npz", "truncated"), ("text.npz", "not a zip archive \\(it starts with")):
        with pytest.raises(DataError, match=words) as e:
            open_source(str(tmp_path / name))
        assert "allow_pickle" not in str(e.value)
    (tmp_path / "empty.csv").write_text("path,label\nx.png,\n")
    with pytest.raises(DataError, match=r"empty.csv:2: empty label"):
        open_source(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.onnx").write_bytes(b"garbage" * 10)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        predict_files(tmp_path / "bad.onnx", [tmp_path / "a.png"])


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_csv_in_another_encoding_is_named(tmp_path: Path, encoding: str) -> None:
    from medistill.data.sources import open_source

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "é1.png")
    (tmp_path / "m.csv").write_bytes("path,label\nimgs/é1.png,a\n".encode(encoding))
    with pytest.raises(DataError, match="UTF-8"):
        open_source(str(tmp_path / "m.csv"))


def test_generated_csv_bytes_never_crash(tmp_path: Path) -> None:
    """Any bytes as a manifest: read, or a DataError — never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from medistill.data.sources import from_csv

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=200) | st.text(max_size=120).map(lambda t: ("path,label\n" + t).encode("utf-8", "replace")))
    def check(raw: bytes) -> None:
        (tmp_path / "m.csv").write_bytes(raw)
        try:
            from_csv(tmp_path / "m.csv")
        except DataError:
            pass

    check()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("finished")
    run_engine(tiny_cfg(write_npz(d / "d.npz"), d / "run", epochs=1))
    return d / "run"


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize("name", ["split.json", "summary.json", "metrics.jsonl", "config.yaml", "students/student/model.json",
                                  "students/student/metrics.json"])
def test_run_with_a_damaged_file_gives_a_clear_error(finished_run: Path, tmp_path: Path, name: str, damage: str) -> None:
    """evaluate, report and resume on a run with any one file missing or cut short: they work,
    or stop with a MedistillError; no traceback."""
    from medistill.assemble import assemble_run, execute_run
    from medistill.commands.evaluate import evaluate_target
    from medistill.errors import MedistillError
    from medistill.report import build_report

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    f = run / name
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: max(1, len(f.read_bytes()) // 2)])
    for action in (lambda: evaluate_target(run, latency=False), lambda: build_report([run]),
                   lambda: execute_run(assemble_run("train", None, [("out", str(run))], resume=True), resume=True)):
        try:
            action()
        except MedistillError:
            pass


def test_absurd_input_sizes_are_named(tmp_path: Path) -> None:
    from medistill.assemble import assemble_run
    from medistill.config import load_config

    for size in (0, 3, 100000):
        with pytest.raises(ConfigError, match="8 to 4096 px"):
            assemble_run("train", None, [("out", str(tmp_path / "x"))], models=["cnn5"], input_size=size)
    with pytest.raises(ConfigError, match="students.0.input_size"):
        load_config(None, ["students.0.input_size=100000"])


def test_ensemble_member_without_weights_is_named(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.errors import ModelError
    from medistill.rundir import load_ensemble, write_ensemble

    members = []
    for i, t in enumerate(teachers):
        shutil.copytree(t, tmp_path / f"m{i}")
        members.append(tmp_path / f"m{i}")
    write_ensemble(tmp_path / "ens", members)
    (tmp_path / "m1" / "students" / "t" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="is missing"):
        load_ensemble(tmp_path / "ens")


def test_generated_api_arguments_raise_typed_errors(tmp_path: Path) -> None:
    """Any value for the API's arguments: a run, or a MedistillError naming the problem."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from medistill.api import train
    from medistill.errors import MedistillError

    values = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                       st.floats(allow_nan=True), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

    @settings(max_examples=40, deadline=None)
    @given(data=values, model=values, epochs=values, seed=values, config=values)
    def check(data, model, epochs, seed, config) -> None:
        try:
            train(data=data, model=model, epochs=epochs, seed=seed, config=config, out=tmp_path / "never",
                  overrides=["train.epochs=0"], quiet=True)     # epochs=0 is refused: nothing ever trains
        except MedistillError:
            pass

    check()


class _Bad(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        from medistill.errors import DataError

        raise DataError("image x.png is truncated: re-export it (DataError: inside the message stays)")


def test_a_worker_error_keeps_its_own_one_line_message() -> None:
    """An error raised in a DataLoader worker reaches the main process as the same error type
    with the same message — not torch's "Caught DataError in DataLoader worker process 0" and
    the worker's traceback."""
    from medistill.errors import DataError

    with pytest.raises(DataError) as e:
        next(iter(torch.utils.data.DataLoader(_Bad(), num_workers=1)))
    assert str(e.value) == "image x.png is truncated: re-export it (DataError: inside the message stays)"
    assert str(DataError("Caught nothing")) == "Caught nothing"
