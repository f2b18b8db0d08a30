"""The genknowsub-fast command: build, info, demo, and one-line errors with exit code 2."""

import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from genknowsub_fast import LoraLibrary
from genknowsub_fast.cli import main


def _one_line_error(capsys, command: str, message: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"genknowsub-fast {command}: error:") and err.count("\n") == 1, err
    assert message in err, err
    return err


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if the library build (the work of `build`) starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the library was built before the arguments were checked")

    monkeypatch.setattr(LoraLibrary, "from_adapters", refuse)


def test_build_and_info(phi3_setup, tmp_path, capsys):
    out = tmp_path / "lib.safetensors"
    assert main(["build", "--task", *phi3_setup.task, "--general", *phi3_setup.general, "-o", str(out)]) == 0
    lib = LoraLibrary.load(out)
    assert lib.gks == "param" and lib.num_experts == 5
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "general knowledge subtracted (param): general_0, general_1, general_2" in text
    assert "model.layers.1.mlp.down_proj" in text and "96 → 64" in text
    assert "8 modules, " in text  # len(lib) counts experts now; info counts the modules itself


def test_build_gks_without_general_is_an_error(phi3_setup, tmp_path, capsys):
    """Asking for GenKnowSub without general adapters is refused (it used to build a library without GKS)."""
    out = tmp_path / "lib.safetensors"
    assert main(["build", "--task", *phi3_setup.task[:2], "--gks", "delta", "-o", str(out)]) == 2
    assert "no general adapters were given" in capsys.readouterr().err
    assert main(["build", "--task", *phi3_setup.task[:2], "-o", str(out)]) == 0
    assert LoraLibrary.load(out).gks is None


def test_build_general_with_no_directory_is_an_error(phi3_setup, tmp_path, capsys):
    """`--general` followed by nothing used to build a library without GenKnowSub, silently."""
    out = tmp_path / "lib.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["build", "--task", *phi3_setup.task[:2], "--general", "-o", str(out)])
    assert exc.value.code == 2 and "--general" in capsys.readouterr().err and not out.exists()


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
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "max |patched − PEFT| logits" in text and "OK" in text and "FAIL" not in text
    assert "patched" in text and "PEFT Arrow" in text
    assert (tmp_path / "library.safetensors").is_file()
    # The timings: taken in turn, each ratio with the range of its rounds, said to be indicative.
    assert "base, PEFT and patched timed in turn, 2 rounds after a warm-up" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("PEFT Arrow", "patched  "))]
    assert len(rows) == 2 and all(re.fullmatch(r"\([\d.]+-[\d.]+\)", row[-1]) for row in rows), rows
    assert "(indicative: a random 'tiny' model is small" in text
    # the machine the timings ran on, by instruction set
    assert re.search(r"torch CPU capability \w+, routed CPU kernel (scalar|avx2|avx512|not loaded)", text), text[:400]


def test_demo_times_its_models_in_turn():
    """The demo timed base, PEFT and patched one after another (base's repeats, then PEFT's, ...): a load change on
    the machine moved their ratio (2.00× on one run, 0.80× on the next). Now every round times each in turn."""
    from genknowsub_fast.cli.demo import interleaved_times, ratio_summary

    calls = []
    runs = {name: (lambda n=name: calls.append(n) or (1.0, 2.0)) for name in ("base", "PEFT Arrow", "patched")}
    times = interleaved_times(runs, repeats=2, warmup=1)
    assert calls == ["base", "PEFT Arrow", "patched"] * 3
    assert times == {name: [(1.0, 2.0)] * 2 for name in runs}
    assert ratio_summary([2.0, 3.0, 4.0], [1.0, 2.0, 2.0]) == "2.00 (1.50-2.00)"


@pytest.mark.parametrize(
    "output, message",
    [
        ("missing_dir/x.safetensors", "directory 'missing_dir' does not exist"),
        (".", "is a directory"),
        ("/proc/x.safetensors", "cannot write in '/proc'"),
    ],
)
def test_build_output_is_checked_before_any_work(phi3_setup, tmp_path, capsys, monkeypatch, no_build, output, message):
    """`build -o missing_dir/x.safetensors` read every adapter and computed every prototype, then
    crashed with a traceback when writing."""
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--task", *phi3_setup.task, "-o", output]) == 2
    _one_line_error(capsys, "build", message)


def test_build_that_does_not_fit_on_the_disk_is_refused_before_reading_in_one_line(phi3_setup, tmp_path, capsys,
                                                                                     monkeypatch):  # fmt: skip
    from genknowsub_fast.library import adapters

    monkeypatch.setattr(adapters.FileTensors, "read_into", lambda *a, **k: pytest.fail("read before the check"))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("Usage", (), {"free": 1000})())
    out = tmp_path / "x.safetensors"
    assert main(["build", "--task", *phi3_setup.task, "--general", *phi3_setup.general, "-o", str(out)]) == 2
    err = _one_line_error(capsys, "build", "but only 1 KB of disk space is free")
    assert re.search(r"needs \d+ [KM]B, but only", err), err
    assert not out.exists()


def test_errors_from_inside_torch_are_one_line(phi3_setup, tmp_path, capsys, monkeypatch):
    """only ValueError was turned into a one-line message; a RuntimeError or OSError from torch or
    safetensors printed a traceback. --traceback shows it when wanted."""

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory\nwhile allocating")

    monkeypatch.setattr(LoraLibrary, "from_adapters", boom)
    args = ["build", "--task", *phi3_setup.task, "-o", str(tmp_path / "x.safetensors")]
    assert main(args) == 2
    _one_line_error(capsys, "build", "RuntimeError: out of memory while allocating")
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["--traceback", *args])


def test_pickled_adapter_refusal_names_the_cli_flag(phi3_setup, tmp_path, capsys):
    """the command line's refusal said `allow_pickle=True`, an argument the user cannot pass there."""
    d = shutil.copytree(phi3_setup.task[0], tmp_path / "pickled")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    args = ["build", "--task", str(d), *phi3_setup.task[1:3], "-o", str(tmp_path / "x.safetensors")]
    assert main(args) == 2
    err = _one_line_error(capsys, "build", "pass --allow-pickle if you trust it")
    assert "allow_pickle=True" not in err
    assert main([*args, "--allow-pickle"]) == 0


def _copy_naming_base(src, dst, base_model):
    import json

    d = shutil.copytree(src, dst)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_model
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_build_names_and_base_model_name(phi3_setup, tmp_path, capsys):
    """The command-line forms of the duplicate-name and base-model-name checks: --names with duplicates, and
    --base-model-name for one base model named two ways; each refusal names the flag."""
    first = _copy_naming_base(phi3_setup.task[0], tmp_path / "a" / "task_0", "microsoft/Phi-3-mini-4k-instruct")
    other = _copy_naming_base(phi3_setup.task[1], tmp_path / "b" / "task_0", "/models/my-phi3")
    out = str(tmp_path / "x.safetensors")
    assert main(["build", "--task", first, other, "--names", "a", "a", "-o", out]) == 2
    _one_line_error(capsys, "build", "(command line: --names) has duplicates: ['a']")
    assert main(["build", "--task", first, other, "-o", out]) == 2  # told apart by their parents: a/task_0, b/task_0
    _one_line_error(capsys, "build", "(a/task_0: microsoft/Phi-3-mini-4k-instruct; b/task_0: /models/my-phi3)")
    args = ["build", "--task", first, other, "--names", "a", "b", "-o", out]
    assert main(args) == 2
    _one_line_error(capsys, "build", "--base-model-name")
    assert main([*args, "--base-model-name", "microsoft/Phi-3-mini-4k-instruct"]) == 0
    lib = LoraLibrary.load(out)
    assert lib.expert_names == ["a", "b"] and lib.base_model_name == "microsoft/Phi-3-mini-4k-instruct"
    assert main(["info", out]) == 0 and "base model: microsoft/Phi-3-mini-4k-instruct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tokens", "0"], "argument --tokens: expected an integer ≥ 1"),
        (["--decode", "0"], "argument --decode: expected an integer ≥ 1"),
        (["--repeats", "-1"], "argument --repeats: expected an integer ≥ 1"),
        (["--tasks", "x"], "argument --tasks: expected an integer ≥ 1"),
        (["--general", "-1"], "argument --general: expected an integer ≥ 0"),
    ],
)
def test_demo_numbers_are_checked_while_parsing(capsys, extra, message):
    """For the demo: `--decode 0` divided by zero after the whole demo had run."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "tiny", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("genknowsub-fast demo: error:") and err.count("\n") == 1 and message in err, err


def test_demo_checks_before_building(capsys, monkeypatch):
    """--top-k above --tasks was silently lowered; a bad --out failed after the model and adapters were built."""
    import genknowsub_fast.synthetic as synthetic

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(synthetic, "make_phi3", refuse)
    assert main(["demo", "--size", "tiny", "--tasks", "2", "--top-k", "3"]) == 2
    _one_line_error(capsys, "demo", "--top-k 3 is more than the 2 task adapters")
    assert main(["demo", "--size", "tiny", "--out", "/proc/genknowsub-fast-demo"]) == 2
    _one_line_error(capsys, "demo", "--out '/proc/genknowsub-fast-demo' cannot be created")


def test_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "-o", "x.safetensors"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "genknowsub-fast build: error: the following arguments are required: --task " + (
        "(see genknowsub-fast build --help)\n"
    )


# ------------------------------------------------------------------ the original code's Trainer checkpoint layout
def test_build_from_trainer_checkpoints(trainer_runs, tmp_path, capsys):
    """`build` on <run>/checkpoint-17 adapters as Trainer saves them: experts and general adapters named after their
    runs; explicit names for every list; a run directory refused with its checkpoints, highest step first."""
    out = str(tmp_path / "lib.safetensors")
    assert main(["build", "--task", *trainer_runs.task, "--general", *trainer_runs.general, "-o", out]) == 0
    lib = LoraLibrary.load(out)
    assert lib.expert_names == ["cluster0_batch16", "cluster1_batch16", "cluster2_batch16"]
    assert lib.general_names == ["wiki_langen", "wiki_langde", "wiki_langfr"]
    capsys.readouterr()
    args = ["build", "--task", *trainer_runs.task[:2], "--general", trainer_runs.general[0], "--add"]
    args += [trainer_runs.general[1], "--names", "c0", "c1", "--general-names", "en", "--add-names", "de"]
    assert main([*args, "--add-weights", "-1", "-o", out]) == 0
    lib = LoraLibrary.load(out)
    assert (lib.expert_names, lib.general_names, lib.added_names) == (["c0", "c1"], ["en"], ["de"])
    capsys.readouterr()
    assert main(["info", out]) == 0  # info shows every list's names
    text = capsys.readouterr().out
    assert "experts: c0, c1\n" in text and "subtracted (param): en\n" in text
    assert "added after the subtraction: de\n" in text
    run = os.path.dirname(trainer_runs.task[0])
    assert main(["build", "--task", run, trainer_runs.task[1], "-o", out]) == 2
    _one_line_error(capsys, "build", "(checkpoint-17, checkpoint-9, highest step first); pass the checkpoint to use")
    assert main(["build", "--task", *trainer_runs.task[:2], "--general-names", "en", "-o", out]) == 2
    _one_line_error(capsys, "build", "1 general_names (command line: --general-names) given for 0 general adapters")
    general = ["--general", *trainer_runs.general[:2], "--general-names", "en", "en", "-o", out]
    assert main(["build", "--task", *trainer_runs.task[:2], *general]) == 2
    _one_line_error(capsys, "build", "general_names (command line: --general-names) has duplicates: ['en']")
