"""The genknowsub-fast command: build, info, demo, and one-line errors with exit code 2."""

import pytest

from genknowsub_fast import LoraLibrary
from genknowsub_fast.cli import main


def test_build_and_info(phi3_setup, tmp_path, capsys):
    out = tmp_path / "lib.safetensors"
    assert main(["build", "--task", *phi3_setup.task, "--general", *phi3_setup.general, "-o", str(out)]) == 0
    lib = LoraLibrary.load(out)
    assert lib.gks == "param" and lib.num_experts == 5
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "general knowledge subtracted (param): general_0, general_1, general_2" in text
    assert "model.layers.1.mlp.down_proj" in text and "96 → 64" in text


def test_build_gks_without_general_is_an_error(phi3_setup, tmp_path, capsys):
    """Asking for GenKnowSub without general adapters is refused (it used to build a library without GKS)."""
    out = tmp_path / "lib.safetensors"
    assert main(["build", "--task", *phi3_setup.task[:2], "--gks", "delta", "-o", str(out)]) == 2
    assert "no general adapters were given" in capsys.readouterr().err
    assert main(["build", "--task", *phi3_setup.task[:2], "-o", str(out)]) == 0
    assert LoraLibrary.load(out).gks is None


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genknowsub-fast info: error:") and err.count("\n") == 1
    assert main(["build", "--task", str(tmp_path / "nope"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_demo_tiny_passes_its_checks(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--size",
            "tiny",
            "--tasks",
            "4",
            "--general",
            "2",
            "--rank",
            "4",
            "--tokens",
            "16",
            "--decode",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "max |patched − PEFT| logits" in text and "OK" in text and "FAIL" not in text
    assert "patched" in text and "PEFT Arrow" in text
    assert (tmp_path / "library.safetensors").is_file()
