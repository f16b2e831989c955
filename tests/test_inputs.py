"""Damaged, foreign or meaningless input is named and refused (one line, exit 2), never
used, and never a traceback; a command that fails leaves what was there before. The
probes of issue 46, one test per kind."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import SIM_JOB

from study import cli, config, simulate

COSTS = {"device": "cpu", "costs": {"resnet18@32": {"train": 1e-3, "attack": 5e-4, "infer": 2e-4}}}


def _fails(capsys, argv, *said) -> str:
    """``study ARGV`` exits 2 with one line on stderr holding each of ``said``."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(s in err for s in said), err
    return err


@pytest.fixture
def pilot(tmp_path):
    """A simulated pilot's OUT (3 seeds × 300 images), its job file and a costs file."""
    out = tmp_path / "pilot"
    out.mkdir()
    df, masks = simulate.study(simulate.masks_for(np.random.default_rng(1), 3, 300, 20.0, 2.0))
    df.to_csv(out / "results.csv", index=False)
    (out / "per_image.json").write_text(json.dumps(masks))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    argv = ["plan", tmp_path / "job.yaml", "--costs", tmp_path / "costs.json", "--no-measure", "--evidence", out]
    return out, df, masks, argv


# -- Why 3: a costs file that lets a limit through ---------------------------------------
@pytest.mark.parametrize(
    "costs, said",
    [
        ({"device": "cpu", "costs": {"resnet18@32": {"train": float("nan"), "attack": 0, "infer": 0}}}, "train"),
        ({"device": "cpu", "costs": {"resnet18@32": {"train": 1e-3, "attack": -5, "infer": 0}}}, "attack"),
        ({"device": "cpu", "costs": {"resnet18@32": {"train": "fast", "attack": 0, "infer": 0}}}, "train"),
        ({"device": "cpu", "costs": {"resnet18@32": {"attack": 0, "infer": 0}}}, "train"),
        ([1, 2], "not a costs file"),
        ({"costs": [1]}, "not a costs file"),
        ({}, "not a costs file"),
    ],
)
def test_a_costs_file_with_nan_negative_or_missing_costs_is_refused(tmp_path, capsys, costs, said):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    _fails(
        capsys, ["plan", tmp_path / "job.yaml", "--costs", tmp_path / "costs.json", "--no-measure"], "costs.json", said
    )
    # and a run whose limits rest on it is refused before anything starts
    limited = {**SIM_JOB, "limits": {"gpu_hours": 0.001, "costs": str(tmp_path / "costs.json")}}
    (tmp_path / "limited.yaml").write_text(yaml.safe_dump(limited))
    _fails(capsys, ["run", tmp_path / "limited.yaml", "--out", tmp_path / "out"], "costs.json")
    assert not (tmp_path / "out").exists()


def test_a_costs_path_that_is_a_folder_or_not_json_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    (tmp_path / "adir").mkdir()
    _fails(capsys, ["plan", tmp_path / "job.yaml", "--costs", tmp_path / "adir"], "adir: a folder")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    (tmp_path / "bad.json").write_text("{")
    _fails(capsys, ["plan", tmp_path / "job.yaml", "--costs", tmp_path / "bad.json"], "bad.json: not valid JSON")


# -- Why 4: plan --evidence on damaged or foreign input -----------------------------------
def test_the_intact_pilot_is_read(pilot, capsys):
    *_, argv = pilot
    assert cli.main([str(a) for a in argv]) == 0
    assert "over 3 seeds × 300 images" in capsys.readouterr().out


def _damage_results(out, df, how):
    if how == "truncated":
        text = (out / "results.csv").read_text()
        (out / "results.csv").write_text(text[: len(text) * 2 // 3])
    else:
        df.drop(columns=[how]).to_csv(out / "results.csv", index=False)


@pytest.mark.parametrize(
    "how, said",
    [
        ("truncated", "truncated"),
        ("seed", "no seed column"),
        ("attack", "no attack column"),
        ("method", "no method column"),
        ("AAI", "no AAI column"),
    ],
)
def test_a_damaged_results_csv_is_refused_by_name(pilot, capsys, how, said):
    out, df, _, argv = pilot
    _damage_results(out, df, how)
    _fails(capsys, argv, "results.csv", said)


def _damage_masks(masks, how):
    stage = sorted(masks)[0]
    m = next(iter(masks[stage].values()))
    if how == "letters":
        m["correct"] = m["correct"].replace("0", "x", 1)
    elif how == "robust, not correct":
        i = m["correct"].index("0")
        m["robust"] = m["robust"][:i] + "1" + m["robust"][i + 1 :]
    elif how == "shortened":
        m["correct"], m["robust"] = m["correct"][:-10], m["robust"][:-10]
    elif how == "integers":
        m["correct"] = 1
    elif how == "list":
        return [masks]
    elif how == "foreign":
        masks["0123456789abcdef"] = masks.pop(stage)
    return masks


@pytest.mark.parametrize(
    "how, said",
    [
        ("letters", "characters other than 0 and 1"),
        ("robust, not correct", "robust but not correct"),
        ("shortened", "shortened"),
        ("integers", "strings of 0 and 1"),
        ("list", "got a list"),
        ("foreign", "another run's file"),
    ],
)
def test_damaged_or_foreign_masks_are_refused_by_name(pilot, capsys, how, said):
    out, _, masks, argv = pilot
    (out / "per_image.json").write_text(json.dumps(_damage_masks(masks, how)))
    _fails(capsys, argv, "per_image.json", said)


def test_a_truncated_per_image_json_and_another_jobs_out_are_refused(pilot, capsys):
    out, df, _, argv = pilot
    text = (out / "per_image.json").read_text()
    (out / "per_image.json").write_text(text[: len(text) // 2])
    _fails(capsys, argv, "per_image.json: not valid JSON")
    (out / "per_image.json").write_text(text)
    df.assign(job="demo").to_csv(out / "results.csv", index=False)
    _fails(capsys, argv, "results of job demo, not of sim")


# -- Why 2: a failed report destroys nothing ----------------------------------------------
def test_a_report_that_fails_half_way_leaves_the_one_before_untouched(tmp_path):
    from study.report import page as report_page
    from study.report import sources

    df = sources.read_results(Path(__file__).parent / "fixtures" / "demo" / "results.csv")
    folder = tmp_path / "B"
    report_page.build(df, {}, folder, title="good")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"index.html", "fig3_cca.png", "claims.json"} <= set(before)
    with pytest.raises((AttributeError, KeyError)):  # a frame without AAI: the report breaks half-way
        report_page.build(df.drop(columns=["AAI"]), {}, folder, title="bad")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["B"]  # no temporary folder left
    # the command refuses such a results.csv before it draws anything
    df.drop(columns=["AAI"]).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"results.csv: no AAI column"):
        sources.read_results(tmp_path / "results.csv")


# -- Why 5: files written where they should not be ----------------------------------------
def test_out_must_be_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        cli.main(["run", str(tmp_path / "job.yaml"), "--out", ""])
    assert exit_.value.code == 2 and "empty folder name" in capsys.readouterr().err
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "mine.txt").write_text("untracked")
    _fails(capsys, ["run", tmp_path / "job.yaml", "--out", repo], "top of a git working tree")
    _fails(capsys, ["run", tmp_path / "job.yaml", "--out", "/"], "the file system's root")
    _fails(capsys, ["report", "--from", tmp_path, "--out", repo], "top of a git working tree")
    assert sorted(p.name for p in repo.iterdir()) == [".git", "mine.txt"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert "mine.txt" in status


def test_a_folder_with_the_users_files_gets_no_marks_and_a_refused_job_leaves_no_out(tmp_path):
    from study.runtime import locks

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    locks.prepare_out(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no .gitignore hiding it
    new = tmp_path / "new"
    assert locks.prepare_out(new) is True and (new / ".gitignore").is_file()
    with locks.exclusive(new):
        pass
    locks.discard(new)
    assert not new.exists()
    locks.prepare_out(mine)
    locks.discard(mine)  # a folder with anything else in it stays
    assert (mine / "notes.txt").is_file()


@pytest.mark.parametrize("name", ["../escape", "/abs/name", "a\0b", "x" * 10_000, ".hidden", "a b"])
def test_a_job_name_is_a_plain_identifier(name):
    with pytest.raises(config.ConfigError, match="^name: "):
        config.parse({**SIM_JOB, "name": name}, check_paths=False)


def test_a_refused_job_leaves_no_new_out(tmp_path, capsys):
    """Refused after OUT was made (a weights pin that does not match): no folder left."""
    import torch
    import torchvision

    w = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18().state_dict(), w)
    job = {**SIM_JOB, "pretrain": {"weights": {"from": str(w), "sha256": "0" * 64}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert cli.main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- Why 6: accepted though meaningless ---------------------------------------------------
@pytest.mark.parametrize(
    "eval_, said",
    [
        ({"attacks": [{"name": "pgd10_linf_0.5", "rel_step": float("nan")}]}, "rel_step"),
        ({"attacks": [{"name": "pgd10_linf_0.5", "rel_step": float("inf")}]}, "rel_step"),
        ({"attacks": [{"name": "pgd10_linf_0.5", "methods": ["partial"]}]}, "select no model"),
        ({"attacks": [{"name": "pgd10_linf_0.5", "methods": ["full"], "datasets": ["source"]}]}, "select no model"),
        ({"attacks": ["pgd10_linf_0.5"], "corruptions": {"names": ["fog"], "datasets": []}}, "empty list"),
        ({"attacks": ["pgd10_linf_0.5"], "corruptions": {"names": ["fog"], "seeds": []}}, "empty list"),
    ],
)
def test_meaningless_eval_entries_are_refused(eval_, said):
    with pytest.raises(config.ConfigError, match=said):
        config.parse({**SIM_JOB, "eval": eval_}, check_paths=False)


def test_a_repeated_key_is_refused_not_dropped(tmp_path):
    text = yaml.safe_dump(SIM_JOB) + "eval:\n  attacks: [fgsm_linf_0.5]\n"
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match=r"job.yaml: not valid YAML \(key 'eval' appears twice"):
        config.load(tmp_path / "job.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(config.ConfigError, match="latin1.yaml: not UTF-8"):
        config.load(tmp_path / "latin1.yaml")


def test_weights_commands_refuse_meaningless_input(tmp_path, capsys):
    import torch
    import torchvision

    _fails(capsys, ["weights", "list", "--backbone", "resnet9000"], "unknown backbone 'resnet9000'")
    (tmp_path / "val").mkdir()
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    verify = ["weights", "verify", tmp_path / "nan.pt", "--backbone", "resnet18", "--data", tmp_path]
    for images in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([str(a) for a in verify] + ["--images", images])
        assert exit_.value.code == 2 and "give at least 1" in capsys.readouterr().err
    _fails(capsys, [*verify, "--attack", "strong_l1_0.5"], "--attack", "unknown attack")
    from study.models import ModelError, build_model, load_trunk_weights

    with pytest.raises(ModelError, match="NaN or infinite values"):
        load_trunk_weights(build_model("resnet18", 10), tmp_path / "nan.pt")


def test_data_prepare_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    _fails(capsys, ["data", "prepare", "alphabet", "--out", tmp_path / "f"], "not a folder")


# -- Why 8: messages that help ------------------------------------------------------------
def _subparser(parser, word):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs[0].choices.get(word) if subs else None


def test_every_command_and_option_a_message_names_exists():
    """Each `study ...` quoted in the package's messages and docstrings names a command
    the parser has, and only options that command takes (`--measure` was named once and
    never existed)."""
    found = set()
    for path in Path(cli.__file__).parent.rglob("*.py"):
        found |= set(re.findall(r"`study ([a-z][^`]*)`", path.read_text()))
    assert len(found) > 5, found
    for text in sorted(found):
        words = text.split()
        parser = cli.build_parser()
        while words and (sub := _subparser(parser, words[0])) is not None:
            parser, words = sub, words[1:]
        assert parser is not cli.build_parser(), f"`study {text}`: no such command"
        options = {o for a in parser._actions for o in a.option_strings}
        named = set(re.findall(r"--[a-z][a-z-]*", " ".join(words)))
        assert named <= options, f"`study {text}`: {sorted(named - options)} are no options of it"


def test_the_seed_check_is_linear():
    """A job with many seeds is checked in one pass (counted in comparisons, not timed:
    the check compared each seed with every one before it)."""
    calls = []

    class Counted(int):
        def __eq__(self, other):
            calls.append(1)
            return int.__eq__(self, other)

        __hash__ = int.__hash__

    for n in (1000, 10_000):
        calls.clear()
        config._no_repeats([Counted(i) for i in range(n)], "seed")
        assert len(calls) <= 2 * n
    with pytest.raises(ValueError, match="seed 3 is listed twice"):
        config._no_repeats([1, 2, 3, 3], "seed")


def test_read_results_names_the_file_on_garbage(tmp_path):
    from study.report import sources

    (tmp_path / "results.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match="results.csv"):
        sources.read_results(tmp_path / "results.csv")
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="results.csv: no dataset, backbone"):
        sources.read_results(tmp_path / "results.csv")


def test_commands_refuse_before_the_heavy_imports():
    """A bad `--images` stops in argparse, before torch loads (the same process)."""
    code = (
        "import sys; from study.cli import main\n"
        "try: main(['weights', 'verify', 'x', '--data', '.', '--images', '0'])\n"
        "except SystemExit as e: print(e.code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr


# -- One door for what is on disk (study.formats) ------------------------------------------
DEMO = Path(__file__).parent / "fixtures" / "demo"  # a real demo's OUT from before the format version


def test_an_out_of_a_newer_format_is_refused_in_one_line(pilot, tmp_path, capsys):
    from study import formats

    out, *_, argv = pilot
    (out / formats.NAME).write_text('{"format": 99}')
    _fails(capsys, argv, "format 99", "newer study")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    _fails(capsys, ["run", tmp_path / "job.yaml", "--out", out, "--quiet"], "format 99", "update study")
    assert not (out / "job.yaml").exists()  # refused before any work
    (out / formats.NAME).write_text('{"format": "two"}')
    _fails(capsys, argv, "format.json", "whole number")


def test_an_older_out_is_read_as_the_current_format_and_left_as_it_is():
    from study import formats
    from study.report import sources

    before = sorted(p.name for p in DEMO.iterdir())
    assert formats.version(DEMO) == 1
    df = sources.read_results(DEMO / "results.csv")
    assert {"method", "job", "chosen"} <= set(df.columns) and "setting" not in df
    found = sources.read_analyses(DEMO / "analyses")
    assert list(found["seeds"]) == [None] and found["seeds"][None]["datasets"]
    assert sorted(p.name for p in DEMO.iterdir()) == before  # a reader writes nothing


def test_a_run_upgrades_an_older_out_in_place_before_it_writes(tmp_path):
    import shutil

    from study import formats
    from study.files import sha256

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "finetune-abc.pt"
    ckpt.write_bytes(b"weights")
    (out / "checkpoints" / "finetune-abc.json").write_text(json.dumps({"run_id": "r", "AOI": 50.0}))
    shutil.copy(DEMO / "results.csv", out / "results.csv")
    (out / "analyses").mkdir()
    shutil.copy(DEMO / "analyses" / "analyses.json", out / "analyses" / "analyses.json")
    said = []
    formats.open_out(out, "demo", log=said.append)
    record = json.loads((out / "checkpoints" / "finetune-abc.json").read_text())
    assert record == {"run_id": "r", "AOI": 50.0, "checkpoint_size": 7, "checkpoint_sha256": sha256(ckpt)}
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "job" and "method" in header and "chosen" in header and "setting" not in header
    assert (out / "analyses" / "analyses.format1.json").is_file() and not (out / "analyses" / "analyses.json").exists()
    assert formats.version(out) == formats.FORMAT and len(said) == 1 and "1 stage record" in said[0]
    formats.open_out(out, "demo", log=said.append)  # the current format: nothing to do
    assert len(said) == 1
    assert formats.version(tmp_path / "new") is None
