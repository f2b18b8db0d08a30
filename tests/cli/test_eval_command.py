"""genknowsub-fast eval: accuracy and per-example JSON equal score_choices; every bad argument is one line, exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast.cli import main
from genknowsub_fast.evaluate import accuracy, score_choices
from genknowsub_fast.synthetic import make_choice_examples, make_tokenizer
from tests.tolerances import FP32_SCORES_SAME_MATH


@pytest.fixture(scope="module")
def files(phi3_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    model_dir = root / "model"
    phi3_setup.base.save_pretrained(model_dir)
    make_tokenizer(128).save_pretrained(model_dir)
    lib = root / "lib.safetensors"
    gkf.LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general).save(lib)
    data = root / "data.jsonl"
    examples = make_choice_examples(9, seed=11)
    for i, ex in enumerate(examples):
        ex["id"] = f"q{i}"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return {"model": str(model_dir), "library": str(lib), "data": str(data), "examples": examples, "root": root}


def _args(files, **over):
    args = {"--model": files["model"], "--library": files["library"], "--data": files["data"]}
    args.update(over)
    return ["eval", *[x for k, v in args.items() if v is not None for x in (k, v)]]


def test_eval_prints_accuracy_and_writes_per_example_json(phi3_setup, files, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = _args(files, **{"--template": "phi3-chat", "--top-k": "2", "--batch-size": "5", "--out": str(out)})
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    model = gkf.patch_model(phi3_setup.fresh(), gkf.LoraLibrary.load(files["library"]), top_k=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["model"])
    scores = score_choices(model, tok, files["examples"], template="phi3-chat", batch_size=5)
    assert result["accuracy"] == pytest.approx(accuracy(scores, files["examples"]))
    assert f"accuracy {result['accuracy']:.4f} on 9 examples" in printed
    assert result["top_k"] == 2 and result["reduction"] == "mean" and result["num_examples"] == 9
    for row, ex, s in zip(result["examples"], files["examples"], scores):
        assert row["id"] == ex["id"] and row["label"] == ex["label"]
        tol = FP32_SCORES_SAME_MATH
        assert row["scores"] == pytest.approx(s, rel=tol["rtol"], abs=tol["atol"])
        assert row["correct"] == (row["prediction"] == ex["label"])


def _bad_jsonl(files, text):
    path = files["root"] / f"bad_{abs(hash(text))}.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "/nonexistent/model"}, "--model '/nonexistent/model' is not a directory"),
        ({"--library": "/nonexistent/lib.safetensors"}, "--library '/nonexistent/lib.safetensors' does not exist"),
        ({"--data": "/nonexistent/data.jsonl"}, "--data '/nonexistent/data.jsonl' does not exist"),
        ({"--template": "{choice} then {context}"}, "{context} must come before {choice}"),
        ({"--reduction": "max"}, "--reduction 'max': expected one of mean, sum_continuation"),
        ({"--top-k": "0"}, "argument --top-k: expected an integer ≥ 1, got '0'"),
        ({"--top-k": "6"}, "--top-k / --temperature: top_k must be an integer in [1, 5]"),
        ({"--batch-size": "0"}, "argument --batch-size: expected an integer ≥ 1, got '0'"),
        ({"--temperature": "0"}, "argument --temperature: expected a finite number > 0, got '0'"),
        ({"--dtype": "int8"}, "--dtype 'int8': expected one of float32"),
        ({"--device": "tpu"}, "--device 'tpu'"),
        ({"--out": "/nonexistent/dir/results.json"}, "directory '/nonexistent/dir' does not exist"),
        ({"--top-k": "two"}, "argument --top-k: expected an integer ≥ 1, got 'two'"),
        ({"--model": None}, "the following arguments are required: --model"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_before_loading(files, change, message, capsys, monkeypatch):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    try:
        code = main(_args(files, **change))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("genknowsub-fast eval: error:") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"context": "a", "choices": [" b"], "label": 0}\nnot json\n', ":2: not JSON"),
        ('{"context": "a", "choices": [" b", " c"], "label": 2}\n', ":1: 'label' must be an integer in [0, 2)"),
        ('{"context": "a", "choices": [" b"]}\n', ":1: 'label' must be an integer"),
        ('{"context": "a", "choices": " b", "label": 0}\n', ":1: 'choices' must be a non-empty list"),
        ("\n\n", "no examples"),
    ],
)
def test_bad_jsonl_names_the_line(files, text, message, capsys):
    assert main(_args(files, **{"--data": _bad_jsonl(files, text)})) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_out_must_not_be_a_directory(files, tmp_path, capsys):
    assert main(_args(files, **{"--out": str(tmp_path)})) == 2
    assert "is a directory" in capsys.readouterr().err


def test_model_dir_without_config(files, tmp_path, capsys):
    assert main(_args(files, **{"--model": str(tmp_path)})) == 2
    assert "has none of config.json" in capsys.readouterr().err


def test_console_script_error_has_no_traceback(files, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "genknowsub-fast")
    res = subprocess.run(
        [exe, *_args(files, **{"--out": str(tmp_path / "missing" / "r.json")})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "missing").exists()


def test_dtype_and_tokenizer_options(files, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    make_tokenizer(128).save_pretrained(tok_dir)
    out = tmp_path / "r.json"
    argv = _args(files, **{"--tokenizer": str(tok_dir), "--dtype": "bfloat16", "--out": str(out)})
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert all(torch.isfinite(torch.tensor(r["scores"])).all() for r in result["examples"])


def test_top_k_defaults_to_min_3_e_for_a_small_library(phi3_setup, files, tmp_path, capsys):
    """Without --top-k a 2-expert library runs with top-k 2 (it used to be refused: "--top-k 3 is outside [1, 2]"),
    and --out records the temperature used."""
    two = tmp_path / "two.safetensors"
    gkf.LoraLibrary.from_adapters(phi3_setup.task[:2]).save(two)
    out = tmp_path / "r.json"
    assert main(_args(files, **{"--library": str(two), "--out": str(out)})) == 0
    result = json.loads(out.read_text())
    assert result["top_k"] == 2 and result["temperature"] == 1.0
    assert "top-k 2" in capsys.readouterr().out
