"""reproduce/study.py: the study's commands keep every arm of a family at one budget, and its
wall-time table adds up what ran."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "reproduce" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_every_pretrained_arm_has_the_same_budget(study, scale, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for family, arms, build, index in (
        ("cmgems", study.CMGEMS_ARMS[:-1], study.cmgems_commands, 0),  # untrained: no pretraining
        ("barcode", study.BARCODE_ARMS, study.barcode_commands, 1),  # after the split
    ):
        budgets = set()
        for arm in arms:
            done, cmd = build(arm, study.SCALES[scale], data, out)[index]
            assert done == out / family / arm / "train" / "train.done"
            flags = _flags(cmd)
            assert flags["config"].startswith(f"configs/{arm}.py")
            budgets.add(tuple(sorted((k, v) for k, v in flags.items() if k.startswith("config."))))
        assert len(budgets) == 1, budgets


def test_untrained_arm_evaluates_a_random_model_of_the_same_size(study, tmp_path):
    steps = study.cmgems_commands("untrained", study.SCALES["cpu"], tmp_path, tmp_path)
    assert [done.parent.name for done, _ in steps] == [
        "fewshot_Prom-core",
        "fewshot_Splice-40",
        "gue",
    ]
    for _, cmd in steps:
        flags = _flags(cmd)
        assert flags["config.init"] == "random"
        assert flags["config.model.name"] == study.SCALES["cpu"]["cmgems_train"]["model.name"]


def test_times_table_adds_resumed_runs_and_counts_failures(study, tmp_path):
    path = tmp_path / "times.jsonl"
    records = [
        dict(family="cmgems", arm="a", command="pretraining", exit=1, seconds=100.0),
        dict(family="cmgems", arm="a", command="pretraining", exit=0, seconds=500.0),
        dict(family="cmgems", arm="a", command="gue", exit=0, seconds=60.0),
        dict(family="barcode", arm="b", command="eval", exit=0, seconds=3000.0),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = study._times_table(path)
    assert "| cmgems | a | 600 | 60 |  | 660 |" in table
    assert "| barcode | b |  |  | 3,000 | 3,000 |" in table
    assert "In all: 3,660 s (1.02 h); failed commands: 1." in table
    assert study._times_table(tmp_path / "none.jsonl").endswith("not run yet\n")


def test_command_names_follow_the_done_markers(study, tmp_path):
    assert study._command_name(tmp_path / "arm" / "train" / "train.done") == "pretraining"
    assert study._command_name(tmp_path / "arm" / "gue" / "results.json") == "gue"
    assert study._command_name(tmp_path / "split" / "x.split.tsv.gz") == "split"
