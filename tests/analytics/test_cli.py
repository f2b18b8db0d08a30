"""`genknowsub-fast inspect`: tables, PNG plots, and one-line errors with exit code 2."""

import json

import pytest

from genknowsub_fast import LoraLibrary
from genknowsub_fast.cli import main


@pytest.fixture(scope="module")
def lib_path(phi3_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "lib.safetensors"
    LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general).save(path)
    return path


def test_inspect_writes_table_and_plots(lib_path, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["inspect", str(lib_path), "--tokens", "24", "--top-k", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean|cos|" in text and "random Phi-3 'tiny' (top-2)" in text and "usage %" in text
    assert "after GenKnowSub only" in text
    for name in ("prototype_similarity.png", "expert_usage.png", "routing_entropy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((out / "stats.json").read_text())
    assert all(m["tokens"] == 24 for m in stats["routing"]["modules"].values())


def test_inspect_before_after_and_text_file(phi3_setup, lib_path, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text("GenKnowSub subtracts general knowledge. " * 4)
    args = ["inspect", str(lib_path), "--text-file", str(text_file), "--tokens", "40", "--out", str(tmp_path / "o")]
    args += ["--task", *phi3_setup.task, "--general", *phi3_setup.general]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "40 bytes of t.txt" in text
    assert "without GenKnowSub → with it" in text and "after GenKnowSub only" not in text
    assert (tmp_path / "o" / "routing_gks.png").is_file()
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert set(stats["library"]) == {"before", "after"} and stats["routing_without_gks"]["modules"]
    assert main(["inspect", str(lib_path), "--model", "none"]) == 0
    assert "routing of" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "does not exist"),
        (["--text-file", "/nonexistent/t.txt"], "text file"),
        (["--task", "/nonexistent"], "go together"),
        (["--model", "small"], "another base model"),
    ],
)
def test_inspect_errors_are_one_line(lib_path, tmp_path, capsys, extra, message):
    lib = str(tmp_path / "missing.safetensors") if not extra else str(lib_path)
    assert main(["inspect", lib, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genknowsub-fast inspect: error:") and err.count("\n") == 1 and message in err


def test_inspect_out_must_be_a_directory(lib_path, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["inspect", str(lib_path), "--model", "none", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
