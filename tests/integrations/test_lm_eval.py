"""lm-eval model `genknowsub`: through lm-eval's own evaluator it gives score_choices' log-likelihoods, and a plain
`lm_eval` command line finds it (entry point + the startup hook for lm-eval 0.4.13). No hub: local model, tokenizer,
task YAML and JSONL."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast.evaluate import accuracy, score_choices, score_choices_naive
from genknowsub_fast.evaluate.formats import lm_eval_task_yaml
from genknowsub_fast.synthetic import make_choice_examples, make_tokenizer
from tests.tolerances import assert_close_to_reference

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def local(phi3_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    phi3_setup.base.save_pretrained(root / "model")
    make_tokenizer(128).save_pretrained(root / "model")
    gkf.LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general).save(root / "lib.safetensors")
    examples = make_choice_examples(12, seed=21)
    (root / "toy.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (root / "tasks").mkdir()
    (root / "tasks" / "toy.yaml").write_text(lm_eval_task_yaml("genknowsub_toy", str(root / "toy.jsonl")))
    return root, examples


@pytest.mark.slow
def test_through_lm_evals_evaluator_equals_score_choices(phi3_setup, local, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root, examples = local
    res = simple_evaluate(
        model="genknowsub",
        model_args={
            "pretrained": str(root / "model"),
            "library": str(root / "lib.safetensors"),
            "top_k": 2,
            "dtype": "float32",
        },
        tasks=["genknowsub_toy"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        device="cpu",
        batch_size=5,
        log_samples=True,
    )
    samples = sorted(res["samples"]["genknowsub_toy"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([ll for s in samples for ll, _ in s["filtered_resps"]], dtype=torch.float64)

    lib = gkf.LoraLibrary.load(root / "lib.safetensors")
    tok = make_tokenizer(128)
    model = gkf.patch_model(phi3_setup.fresh(), lib, top_k=2)
    ours = score_choices(model, tok, examples, reduction="sum_continuation", batch_size=5)
    model64 = gkf.patch_model(phi3_setup.fresh().double(), lib, top_k=2)
    ref64 = score_choices_naive(model64, tok, examples, reduction="sum_continuation")
    flat = [-torch.tensor([v for row in s for v in row], dtype=torch.float64) for s in (ours, ref64)]
    # lm-eval's log-likelihoods and ours, both float32, against the float64 naive loop.
    assert_close_to_reference(theirs, flat[1], flat[0], torch.float32, "lm-eval loglikelihood")
    assert res["results"]["genknowsub_toy"]["acc,none"] == pytest.approx(accuracy(ours, examples))
    norm = score_choices(model, tok, examples, reduction="per_char_continuation")
    assert res["results"]["genknowsub_toy"]["acc_norm,none"] == pytest.approx(accuracy(norm, examples))
    assert res["config"]["genknowsub_top_k"] == 2


def test_bad_library_is_a_value_error_before_loading(local):
    from genknowsub_fast.integrations.lm_eval import GenKnowSubLM

    root, _ = local
    with pytest.raises(ValueError, match="needs library=FILE"):
        GenKnowSubLM(pretrained=str(root / "model"))
    with pytest.raises(ValueError, match="does not exist"):
        GenKnowSubLM(pretrained="/nonexistent", library=str(root / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 5\]"):
        GenKnowSubLM(pretrained="/nonexistent", library=str(root / "lib.safetensors"), top_k=9)


def _run(cmd, **kw):
    env = {**os.environ, **OFFLINE}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_the_hook_registers_lazily_and_keeps_the_builtin_models():
    code = (
        "import sys, lm_eval.api.registry as r; from lm_eval.api.registry import get_model; get_model('hf');"
        "print(r.model_registry._objs['genknowsub'], 'hf' in r.model_registry,"
        " 'genknowsub_fast.integrations.lm_eval' in sys.modules)"
    )
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["genknowsub_fast.integrations.lm_eval:GenKnowSubLM", "True", "False"]


@pytest.mark.slow
def test_plain_lm_eval_command_line(local):
    root, examples = local
    exe = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    out = root / "cli_out"
    res = _run(
        [
            exe,
            "run",
            "--model",
            "genknowsub",
            "--model_args",
            f"pretrained={root / 'model'},library={root / 'lib.safetensors'},top_k=2",
            "--device",
            "cpu",
            "--tasks",
            "genknowsub_toy",
            "--include_path",
            str(root / "tasks"),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "genknowsub_toy" in res.stdout and "acc" in res.stdout
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    assert result["config"]["model"] == "genknowsub"
    assert 0.0 <= result["results"]["genknowsub_toy"]["acc,none"] <= 1.0


def test_the_wheel_installs_the_entry_point_and_the_hook(tmp_path):
    """A built wheel carries the `lm_eval.models` entry point and puts the hook at the top of site-packages."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("genknowsub_fast", "triton_kernels", "csrc", "site_hooks"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(src / name)], check=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        subprocess.run(["cp", str(ROOT / name), str(src / name)], check=True)
    env = {**os.environ, "GENKNOWSUB_FAST_EXTENSION": "off"}
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(tmp_path.glob("genknowsub_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    data = [n for n in names if ".data/purelib/" in n]
    assert sorted(Path(n).name for n in data) == ["genknowsub_fast_lm_eval.pth", "genknowsub_fast_lm_eval_hook.py"]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[lm_eval.models]" in entry_points
    assert "genknowsub = genknowsub_fast.integrations.lm_eval:GenKnowSubLM" in entry_points
    assert "genknowsub_fast/integrations/lm_eval.py" in names
