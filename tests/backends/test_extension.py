"""The extension loader: built library, JIT build into a locked cache, forced fallback, one-line notice, fake impls."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from genknowsub_fast.backends import extension

ROOT = Path(__file__).resolve().parents[2]
HAVE_CXX = bool(shutil.which("c++") or shutil.which("g++"))


def _run(code: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(extension.ENV_SWITCH, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


# In the child: hide the setup.py-built library so the loader has to JIT-build (or fail).
HIDE_BUILT = """
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "genknowsub_fast._C" else _find(name, *a)
"""


def _hidden(body: str) -> str:
    return HIDE_BUILT + textwrap.dedent(body)


def test_status_and_ops_registered():
    ok, reason = extension.status()
    if not ok:
        if HAVE_CXX:
            pytest.fail(f"a C++ compiler is here but the extension did not load: {reason}")
        pytest.skip(reason)
    assert reason == "loaded"
    for name in extension.OPS:
        assert extension.has_op(name)
    assert not extension.has_op("no_such_op")


def test_env_switch_forces_torch_fallback_with_one_notice():
    proc = _run(
        """
        import warnings, torch
        warnings.simplefilter("always")
        from genknowsub_fast import ops
        from genknowsub_fast.backends import extension, prototype_ext
        with warnings.catch_warnings(record=True) as w:
            a, b = torch.randn(3, 4, 20), torch.randn(3, 10, 4)
            p1 = ops.arrow_prototypes(a, b)
            p2, _ = prototype_ext.exact_prototypes_batched([a], [b])
            assert extension.load() is False and not extension.has_op("arrow_prototypes")
        notices = [x for x in w if "compiled extension unavailable" in str(x.message)]
        assert len(notices) == 1, [str(x.message) for x in w]
        assert "\\n" not in str(notices[0].message)
        print(extension.status()[1])
        print(notices[0].message)
        """,
        {extension.ENV_SWITCH: "off"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disabled by GENKNOWSUB_FAST_EXTENSION=off" in proc.stdout


def test_failed_build_falls_back_to_torch_path():
    proc = _run(
        _hidden(
            """
        import warnings, torch
        from genknowsub_fast.backends import extension, torch_prototypes
        def boom():
            raise RuntimeError("compiler exploded\\nsecond line")
        extension._jit_build = boom
        from genknowsub_fast import ops
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a, b = torch.randn(3, 4, 20), torch.randn(3, 10, 4)
            p = ops.arrow_prototypes(a, b)
            ops.arrow_prototypes(a, b)
        assert torch.equal(p, torch_prototypes.exact_prototypes(a, b)[0])
        msgs = [str(x.message) for x in w if "compiled extension unavailable" in str(x.message)]
        assert len(msgs) == 1 and "\\n" not in msgs[0] and "second line" in msgs[0], msgs
        print(msgs[0])
        """
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JIT build failed" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_jit_build_into_cache_two_processes(request, tmp_path_factory):
    """Two processes JIT-build at once into one cache dir: the file lock makes one build, both load the ops.

    The cache lives in pytest's cache dir (per-source-hash subdirectories), so only the first run compiles (~30 s on 2
    cores); later runs check that both processes load the cached build.
    """
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider: build in a temp dir then
    tmp_path = Path(cache.mkdir("genknowsub_fast_jit")) if cache else tmp_path_factory.mktemp("genknowsub_fast_jit")
    code = _hidden(
        """
        import torch
        from genknowsub_fast.backends import extension
        ok, reason = extension.status()
        assert ok, reason
        a, b = torch.randn(2, 4, 30), torch.randn(2, 12, 4)
        p, z = torch.ops.genknowsub_fast_C.arrow_prototypes(a, b)
        print("OK", p.shape[1])
        """
    )
    env = dict(os.environ, GENKNOWSUB_FAST_CACHE=str(tmp_path))
    env.pop(extension.ENV_SWITCH, None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        assert "OK 30" in out
    for build_dir in tmp_path.iterdir():
        assert len(list(build_dir.glob("*.so"))) == 1, list(build_dir.iterdir())


@pytest.mark.skipif(not extension.load(), reason="extension not loaded")
def test_routed_lora_op_schema_and_fake():
    schema = torch.ops.genknowsub_fast_C.routed_lora_delta_.default._schema
    assert str(schema.returns) == "[]" and schema.arguments[0].alias_info.is_write
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.empty(5, 7, dtype=torch.bfloat16)
        x = torch.empty(5, 6, dtype=torch.bfloat16)
        protos = torch.empty(3, 6)
        a = torch.empty(3, 2, 6, dtype=torch.bfloat16)
        bt = torch.empty(3, 2, 7, dtype=torch.bfloat16)
        op = torch.ops.genknowsub_fast_C.routed_lora_delta_
        assert op(y, x, protos, a, bt, 2, 1.0, False, None) is None
        assert op(y, x, protos, a, bt, 2, 1.0, False, torch.empty(5, 3)) is None


@pytest.mark.skipif(not extension.load(), reason="extension not loaded")
def test_prototypes_op_under_torch_compile():
    def f(a, b):
        p, z = torch.ops.genknowsub_fast_C.arrow_prototypes(a, b)
        return p * 2, z

    a, b = torch.randn(3, 4, 20), torch.randn(3, 10, 4)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    p, z = compiled(a, b)
    torch.testing.assert_close(p, 2 * torch.ops.genknowsub_fast_C.arrow_prototypes(a, b)[0])
