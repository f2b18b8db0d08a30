"""The README's "Serving with vLLM" snippets, run as written: the Python example, then vLLM's OpenAI-compatible
server with the same model and library on the loopback, queried with the README's plain client request; the client
must get the text make_llm generated (the earlier example served a model without a tokenizer: a plain client got
"text": "")."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integrations.vllm.served import require_vllm

require_vllm()

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[3] / "README.md"
SERVER_START_S = 600


def _snippets() -> tuple[str, str, dict]:
    """The Python example, the server command and the client's request body."""
    text = README.read_text()
    block = text.split("<!-- vllm-example -->", 1)[1].split("<!-- /vllm-example -->", 1)[0]
    python = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    server, client = (b.replace("\\\n", " ").strip() for b in re.findall(r"```bash\n(.*?)```", block, re.S))
    assert "#" not in server, "one command, no comments: the test appends --port to it"
    assert "--host 127.0.0.1" in server, "the example server listens on the loopback only"
    assert client.startswith("curl -s http://127.0.0.1:8000/v1/completions"), client
    body = json.loads(re.search(r"-d '(\{.*\})'", client).group(1))
    return python, server, body


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this environment's python
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"the server was not healthy after {SERVER_START_S} s")


def test_readme_serving_example_runs_and_a_plain_client_gets_its_text(tmp_path):
    python, server, body = _snippets()
    (tmp_path / "example.py").write_text(python)
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [line for line in done.stdout.splitlines() if re.fullmatch(r"(['\"]).*\1", line.strip())]
    assert len(printed) == 1, f"expected one printed text in the example's output: {done.stdout[-2000:]}"
    generated = ast.literal_eval(printed[0].strip())
    assert generated, "the example's model generated no visible text"
    assert body["prompt"] in python, "the client sends the example's prompt"

    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # As written, plus a free port: the default 8000 may be taken on a shared machine.
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {server} --port {port}"],
            cwd=tmp_path,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its engine processes, stopped below
        )
        try:
            _wait_healthy(proc, port)
            reply = _post(f"http://127.0.0.1:{port}/v1/completions", body)  # the README's request, nothing added
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
        finally:
            _stop(proc)
    assert reply["choices"][0]["text"] == generated
    assert "linear layers routed through lib.safetensors" in log_path.read_text(), "the server must route the model"


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_server_without_tokenizer_returns_token_ids_when_asked(tmp_path):
    """The README's note on checkpoints without a tokenizer: served with --skip-tokenizer-init, a prompt of token ids
    gets an empty "text", and "return_token_ids": true returns the generated ids, those of the patched model (which
    make_llm generates too: test_engine.py)."""
    from tests.integrations.vllm.served import NEW_TOKENS, PROMPTS, TOP_K, make_checkpoint, transformers_reference

    ckpt = make_checkpoint(str(tmp_path), "phi3")
    expected = transformers_reference(ckpt).greedy[0]
    overrides = {
        "architectures": ["GenKnowSubPhi3ForCausalLM"],
        "genknowsub_fast": {"library": ckpt.library_path, "top_k": TOP_K},
    }
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt.path, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--skip-tokenizer-init", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.1", "--hf-overrides", json.dumps(overrides),
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_healthy(proc, port)
            body = {"model": ckpt.path, "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
            body["ignore_eos"] = True  # as the reference: all NEW_TOKENS tokens
            plain = _post(f"http://127.0.0.1:{port}/v1/completions", body)
            with_ids = _post(f"http://127.0.0.1:{port}/v1/completions", {**body, "return_token_ids": True})
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
        finally:
            _stop(proc)
    assert plain["choices"][0]["text"] == "" and not plain["choices"][0].get("token_ids")
    assert with_ids["choices"][0]["token_ids"] == expected
