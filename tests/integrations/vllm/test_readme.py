"""The README's "Serving with vLLM" snippets, run as written: the Python example, then `vllm serve` with the same
model and library, queried over HTTP on the loopback; the server must generate the tokens make_llm generated."""

from __future__ import annotations

import ast
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
PROMPT = [1, 20, 30, 40]
SERVER_START_S = 600


def _snippets() -> tuple[str, str]:
    text = README.read_text()
    block = text.split("<!-- vllm-example -->", 1)[1].split("<!-- /vllm-example -->", 1)[0]
    python = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return python, bash.replace("\\\n", " ").strip()


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the environment's `vllm`
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
            raise AssertionError(f"vllm serve exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve was not healthy after {SERVER_START_S} s")


def test_readme_serving_example_runs_and_the_server_agrees(tmp_path):
    python, bash = _snippets()
    assert str(PROMPT) in python, "the test queries the server with the README example's prompt"
    (tmp_path / "example.py").write_text(python)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [line for line in done.stdout.splitlines() if re.fullmatch(r"\[[\d, ]*\]", line.strip())]
    assert len(printed) == 1, f"expected one printed token list in the example's output: {done.stdout[-2000:]}"
    tokens = ast.literal_eval(printed[0].strip())
    assert len(tokens) == 8

    port = _free_port()
    # As written, plus a free port: the default 8000 may be taken on a shared machine.
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {bash} --port {port}"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 - closed with the process below
        start_new_session=True,
    )
    try:
        _wait_healthy(proc, port)
        body = {"model": "phi3-small", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        reply = _post(f"http://127.0.0.1:{port}/v1/completions", body)
    except AssertionError:
        raise AssertionError((tmp_path / "serve.log").read_text()[-4000:]) from None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: it and its engine processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert reply["choices"][0]["token_ids"] == tokens
    log = (tmp_path / "serve.log").read_text()
    assert "linear layers routed through lib.safetensors" in log, "the server must have routed the model"
