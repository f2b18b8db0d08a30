"""The library is checked against the model's config before vLLM's engine starts: by make_llm, and by the plugin's
configuration hook, which is what a `vllm serve` / OpenAI server runs (a library for another base model used to fail
about 25 s later inside the engine's start-up, the cause among a hundred log lines)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.integrations.vllm.served import make_checkpoint, require_vllm

require_vllm()

from genknowsub_fast.vllm import hf_overrides  # noqa: E402

pytestmark = pytest.mark.slow
SERVER_EXIT_S = 300


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vllm_check"))
    return make_checkpoint(root, "phi3"), make_checkpoint(root, "phi2"), root


def test_the_configuration_hook_refuses_a_library_for_another_model(checkpoints):
    """What the server runs when it reads the model's configuration, in its own process, before any engine."""
    from vllm.engine.arg_utils import EngineArgs

    phi3, phi2, _ = checkpoints
    overrides = hf_overrides(phi3.path, phi2.library_path)
    args = EngineArgs(model=phi3.path, hf_overrides=overrides, skip_tokenizer_init=True, max_model_len=256)
    with pytest.raises(Exception) as caught:  # vLLM wraps it in its configuration's validation error
        args.create_model_config()
    assert (
        f"library '{phi2.library_path}' does not fit model '{phi3.path}': the library was built for a "
        "PhiForCausalLM, not a Phi3ForCausalLM"
    ) in str(caught.value)
    # the right library passes the same step
    EngineArgs(
        model=phi3.path, hf_overrides=hf_overrides(phi3.path, phi3.library_path), skip_tokenizer_init=True,
        max_model_len=256,
    ).create_model_config()  # fmt: skip


def test_the_server_refuses_it_before_the_engine_starts(checkpoints):
    phi3, phi2, root = checkpoints
    overrides = hf_overrides(phi3.path, phi2.library_path)
    import json

    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", phi3.path, "--host", "127.0.0.1",
        "--port", "0", "--dtype", "float32", "--skip-tokenizer-init", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.1", "--hf-overrides", json.dumps(overrides),
    ]  # fmt: skip
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    start = time.monotonic()
    done = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=SERVER_EXIT_S, stdin=subprocess.DEVNULL
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    line = f"genknowsub_fast: library '{phi2.library_path}' does not fit model '{phi3.path}'"
    assert line in out, out[-3000:]
    assert "Initializing a V1 LLM engine" not in out, "the engine started before the library was refused"
    print(f"refused after {time.monotonic() - start:.1f} s")
