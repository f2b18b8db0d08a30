"""`genknowsub-fast inspect`: tables, PNG plots, no model unless asked, and one-line errors with exit code 2."""

import json

import pytest
import torch

from genknowsub_fast import LoraLibrary, ModuleExperts, arrow_prototypes
from genknowsub_fast.cli import main


@pytest.fixture(scope="module")
def lib_path(phi3_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "lib.safetensors"
    LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general).save(path)
    return path


@pytest.fixture(scope="module")
def mini_lib_path(tmp_path_factory):
    """A library shaped like Phi-3-mini's first qkv_proj (3072 → 9216), 2 experts of rank 1: a few hundred KB, but a
    matching random model would be 3.8 B parameters."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 3072, generator=gen), torch.randn(2, 9216, 1, generator=gen)
    experts = ModuleExperts(a, b, torch.ones(2), arrow_prototypes(a, b), torch.ones(2, dtype=torch.int64))
    path = tmp_path_factory.mktemp("mini") / "mini.safetensors"
    LoraLibrary({"model.layers.0.self_attn.qkv_proj": experts}, ["x", "y"], base_model_class="Phi3ForCausalLM").save(
        path
    )
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a synthetic model is built."""
    import genknowsub_fast.synthetic as synthetic

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(synthetic, "make_phi3", refuse)


@pytest.fixture
def no_work(monkeypatch, no_model):
    """Fail the test if the library statistics (the first work after the checks) start."""
    import genknowsub_fast.analytics.stats as stats

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(stats, "library_stats", refuse)
    monkeypatch.setattr(stats, "compare_gks", refuse)


def _one_line_error(capsys, message: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("genknowsub-fast inspect: error:") and err.count("\n") == 1, err
    assert message in err, err
    return err


def test_inspect_writes_table_and_plots(lib_path, tmp_path, capsys):
    out = tmp_path / "plots"
    args = ["inspect", str(lib_path), "--model", "auto", "--tokens", "24", "--top-k", "2", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean|cos|" in text and "random Phi-3 'tiny' (top-2)" in text and "usage %" in text
    assert "after GenKnowSub only" in text
    for name in ("prototype_similarity.png", "expert_usage.png", "routing_entropy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((out / "stats.json").read_text())
    assert all(m["tokens"] == 24 for m in stats["routing"]["modules"].values())
    assert stats["routing_inputs"] == "random Phi-3 'tiny', random token ids"


def test_routing_output_says_it_comes_from_a_random_model(lib_path, capsys):
    """routing statistics of random weights on random tokens were printed as if they meant something."""
    assert main(["inspect", str(lib_path), "--model", "tiny", "--tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "building a random Phi-3 'tiny': 0.1 M parameters" in text
    assert "note: routing of a randomly initialised model on random token ids" in text
    assert "not how your base model routes real text" in text and "record_routing" in text


def test_inspect_before_after_and_text_file(phi3_setup, lib_path, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text("GenKnowSub subtracts general knowledge. " * 4)
    args = ["inspect", str(lib_path), "--model", "auto", "--text-file", str(text_file), "--tokens", "40"]
    args += ["--out", str(tmp_path / "o"), "--task", *phi3_setup.task, "--general", *phi3_setup.general]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "40 bytes of t.txt" in text
    assert "without GenKnowSub → with it" in text and "after GenKnowSub only" not in text
    assert "randomly initialised model on byte-mapped text" in text
    assert (tmp_path / "o" / "routing_gks.png").is_file()
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert set(stats["library"]) == {"before", "after"} and stats["routing_without_gks"]["modules"]
    assert main(["inspect", str(lib_path), "--model", "none"]) == 0
    assert "routing of" not in capsys.readouterr().out


def test_no_model_is_built_unless_asked(lib_path, capsys, no_model):
    """`inspect lib` built a random model by default (--model auto); now only --model builds one, and
    the output says what it would cost."""
    assert main(["inspect", str(lib_path)]) == 0
    text = capsys.readouterr().out
    assert "mean|cos|" in text
    assert "routing not measured (no --model): --model auto would build a random Phi-3 'tiny'" in text


def test_phi3_mini_shaped_library_costs_are_said_and_checked(mini_lib_path, capsys, monkeypatch, no_model):
    """a Phi-3-mini-shaped library made `inspect` build a random 3.8 B-parameter fp32 model (15 GB) by
    default and crash under a 6 GB limit after printing the stats. Now the default builds nothing and names the cost,
    and an explicit --model that does not fit in memory is refused before anything is built or computed."""
    import genknowsub_fast.memory as memory

    assert main(["inspect", str(mini_lib_path)]) == 0
    assert "random Phi-3 'phi3-mini': 3.82 B parameters, 15.3 GB in float32" in capsys.readouterr().out
    monkeypatch.setattr(memory, "available_bytes", lambda: 6_000_000_000)
    for model in ("auto", "phi3-mini"):
        assert main(["inspect", str(mini_lib_path), "--model", model]) == 2
        _one_line_error(capsys, "15.3 GB in float32, but only 6.0 GB of memory is available")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-k", "0"], "argument --top-k: expected an integer ≥ 1, got '0'"),
        (["--top-k", "two"], "argument --top-k: expected an integer ≥ 1, got 'two'"),
        (["--tokens", "0"], "argument --tokens: expected an integer ≥ 1"),
        (["--temperature", "0"], "argument --temperature: expected a finite number > 0"),
        (["--temperature", "nan"], "argument --temperature: expected a finite number > 0"),
    ],
)
def test_numbers_are_checked_while_parsing(lib_path, capsys, no_work, extra, message):
    """--top-k, --temperature and --tokens were checked only after the work."""
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(lib_path), "--model", "auto", *extra])
    assert exc.value.code == 2
    _one_line_error(capsys, message)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-k", "9"], "top_k must be an integer in [1, 5]"),
        (["--out", "/proc/genknowsub-fast-test"], "--out '/proc/genknowsub-fast-test' cannot be created"),
        (["--model", "small"], "another base model"),
        (["--text-file", "/nonexistent/t.txt"], "text file"),
        (["--task", "/nonexistent"], "go together"),
        (["--task", "/nonexistent", "--general", "/nonexistent2"], "does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(lib_path, capsys, no_work, extra, message):
    """`inspect --out /proc/x` did all the work and then crashed with a traceback; a --top-k above
    the number of experts was found only when the model was patched."""
    assert main(["inspect", str(lib_path), *extra]) == 2
    _one_line_error(capsys, message)


def test_missing_library_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    _one_line_error(capsys, "does not exist")


def test_inspect_out_must_be_a_directory(lib_path, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["inspect", str(lib_path), "--out", str(f)]) == 2
    _one_line_error(capsys, "not a directory")
