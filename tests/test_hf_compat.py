"""cache_kwarg: the KV-cache argument name the installed transformers' forward takes, for plain and PEFT models;
peft_without_bitsandbytes: the demo does not import bitsandbytes (nor show its kernel message), a 4-bit model does."""

import inspect
import os

import pytest
import torch

from genknowsub_fast.hf_compat import cache_kwarg


class OldStyle(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return input_ids


class NewStyle(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None):
        return input_ids


class Wrapper(torch.nn.Module):  # the shape of a PeftModel: forward(**kwargs), the model behind get_base_model()
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_base_model(self):
        return self.inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("cls, name", [(OldStyle, "past_key_values"), (NewStyle, "cache")])
def test_the_name_follows_the_forward_signature(cls, name):
    assert cache_kwarg(cls()) == name
    assert cache_kwarg(Wrapper(cls())) == name


def test_the_installed_phi3_takes_the_name_returned(phi3_setup):
    name = cache_kwarg(phi3_setup.base)
    assert name in inspect.signature(phi3_setup.base.forward).parameters


BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_DEMO_THEN_4BIT = """
import sys
from genknowsub_fast.cli import main
from genknowsub_fast.synthetic import make_phi3

root = sys.argv[1]
make_phi3("tiny").save_pretrained(root + "/model")
code = main(["demo", "--size", "tiny", "--tasks", "2", "--general", "1", "--top-k", "1", "--tokens", "16",
             "--decode", "2", "--repeats", "1", "--out", root + "/demo"])
print("demo exit", code, "bitsandbytes imported:", "bitsandbytes" in sys.modules, flush=True)
print("=== 4-bit ===", file=sys.stderr, flush=True)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import torch
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
AutoModelForCausalLM.from_pretrained(root + "/model", quantization_config=quant, device_map="cpu")
"""


@pytest.mark.slow
def test_demo_does_not_import_bitsandbytes_but_a_4bit_model_does(tmp_path):
    """`make demo` printed bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (PEFT imported
    bitsandbytes while adding LoRA layers); it must not, and the message must still show when a 4-bit model loads."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run(
        [sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300, env=env
    )
    run = subprocess.run(
        [sys.executable, "-c", _DEMO_THEN_4BIT, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "demo exit 0 bitsandbytes imported: False" in run.stdout, run.stdout[-3000:]
    demo_err, after = run.stderr.split("=== 4-bit ===", 1)
    assert BNB_MESSAGE not in demo_err and BNB_MESSAGE not in run.stdout
    # Where importing bitsandbytes prints it (AVX512-BF16 CPUs without the kernel hub), loading a 4-bit model does.
    assert (BNB_MESSAGE in after) == (BNB_MESSAGE in plain.stderr)
