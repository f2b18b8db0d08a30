"""The README's "Serving with vLLM" snippets, run as written: the Python example, then vLLM's OpenAI-compatible
server with the same model and library, queried over HTTP on the loopback; it must generate the tokens make_llm
generated."""

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
PROMPT = [1, 20, 30, 40]
SERVER_START_S = 600


def _snippets() -> tuple[str, str]:
    text = README.read_text()
    block = text.split("<!-- vllm-example -->", 1)[1].split("<!-- /vllm-example -->", 1)[0]
    python = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    assert "#" not in bash.replace("\\\n", ""), "one command, no comments: the test appends --port to it"
    return python, bash.replace("\\\n", " ").strip()


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
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # As written, plus a free port: the default 8000 may be taken on a shared machine.
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {bash} --port {port}"],
            cwd=tmp_path,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its engine processes, stopped below
        )
        try:
            _wait_healthy(proc, port)
            body = {"model": "phi3-small", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            reply = _post(f"http://127.0.0.1:{port}/v1/completions", {**body, "return_token_ids": True})
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
        finally:
            _stop(proc)
    assert reply["choices"][0]["token_ids"] == tokens
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
