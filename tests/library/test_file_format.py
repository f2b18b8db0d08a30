"""Library files: format 2 holds the experts as the kernels read them and loading maps it (one copy of the experts
from the file to a patched model), format 1 files still load, a file rewritten while mapped does not crash the
process, a library too large for the machine is refused before any work."""

import contextlib
import copy
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, ModuleExperts
from genknowsub_fast.library import file_format, tensor_file
from genknowsub_fast.memory import human_bytes
from genknowsub_fast.patching import patched_layers
from genknowsub_fast.runner import RoutedLinear
from tests.library.format_1 import write_format_1
from tests.tolerances import FP32_SAME_MATH, packed_b

DATA = Path(__file__).parent / "data"
QKV = "model.layers.0.self_attn.qkv_proj"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def _load(path, **kwargs) -> LoraLibrary:
    """LoraLibrary.load, with the warning it gives where this file system offers no read lease turned into a skip
    of what needs a protected mapping."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = LoraLibrary.load(path, **kwargs)
    for w in caught:
        if "instead of mapped" in str(w.message):
            pytest.skip(f"no read lease here: {w.message}")
    return lib


@pytest.fixture(scope="module")
def built(phi3_setup):
    return LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)


# ------------------------------------------------------------------------------------------------------- format 2
def test_saved_file_is_safetensors_with_page_aligned_packed_tensors(built, tmp_path):
    path = tmp_path / "lib.safetensors"
    built.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["genknowsub_fast"])
        keys = set(f.keys())
        b_t = f.get_tensor(f"{QKV}/b_t")
    assert meta["format_version"] == 2 and meta["packed"][QKV] == {"d_out": built.modules[QKV].d_out}
    assert {f"{QKV}/{k}" for k in ("prototypes", "a", "b_t", "scaling", "ranks")} <= keys
    assert all(k.startswith(".align.") for k in keys if "/" not in k)
    packed = built.modules[QKV].packed
    torch.testing.assert_close(b_t[:, :, : packed.d_out], packed.b_t, rtol=0, atol=0)
    assert b_t.shape[2] * b_t.element_size() % 64 == 0 and (b_t.shape[2] * b_t.element_size() // 64) % 2 == 1
    fd = os.open(path, os.O_RDONLY)
    try:
        header = tensor_file.read_header(fd, str(path))
    finally:
        os.close(fd)
    for key, info in header.tensors.items():
        if key.rsplit("/", 1)[-1] in ("prototypes", "a", "b_t"):
            assert (header.data_start + info.begin) % tensor_file.PAGE == 0, key


def test_loading_maps_the_file_and_patching_adds_no_copy(phi3_setup, built, tmp_path):
    path = tmp_path / "lib.safetensors"
    built.save(path)
    lib = _load(path)
    assert lib.storage == "mapped" and str(path) in _mapped_files()
    for p, m in lib.modules.items():
        assert m.is_packed
        for name in ("prototypes", "a", "b_t"):
            assert torch.equal(getattr(m.packed, name), getattr(built.modules[p].packed, name)), (p, name)
    expected = _logits(gkf.patch_model(phi3_setup.fresh(), built), phi3_setup.ids)
    model = gkf.patch_model(phi3_setup.fresh(), lib)
    for layer in patched_layers(model).values():
        m = lib.modules[layer.name]
        assert layer.runner.experts is m, "same device and dtype: the library's experts are the runner's"
        assert layer.runner.packed.a.data_ptr() == m.packed.a.data_ptr()
        assert layer.runner.packed.b_t.data_ptr() == m.packed.b_t.data_ptr()
    del lib
    torch.testing.assert_close(_logits(model, phi3_setup.ids), expected, rtol=0, atol=0)
    gkf.unpatch_model(model)
    del model, layer, m
    import gc

    gc.collect()
    assert str(path) not in _mapped_files(), "the mapping goes with the last tensor that views it"


def test_patched_model_from_a_mapped_library_pickles(phi3_setup, built, tmp_path):
    built.save(tmp_path / "lib.safetensors")
    model = gkf.patch_model(phi3_setup.fresh(), _load(tmp_path / "lib.safetensors"))
    expected = _logits(model, phi3_setup.ids)
    torch.save(model, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(_logits(back, phi3_setup.ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(copy.deepcopy(model), phi3_setup.ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_model_in_another_dtype_packs_once_and_keeps_what_it_needs(phi3_setup, built, tmp_path, dtype):
    """A wider dtype holds the experts exactly: the runner keeps its packing only. A narrower one keeps the library's
    experts too, so that moving the model back gets them as they were."""
    built.save(tmp_path / "lib.safetensors")
    lib = _load(tmp_path / "lib.safetensors")
    model = gkf.patch_model(phi3_setup.fresh().to(dtype), lib)
    layer = patched_layers(model)["model.layers.0.self_attn.qkv_proj"]
    assert layer.runner.packed.a.dtype == dtype and layer.runner.experts.is_packed
    if dtype == torch.float64:
        assert layer.runner.experts.packed is layer.runner.packed
    else:
        assert layer.runner.experts is lib.modules[QKV]
    model.float()
    _logits(model, phi3_setup.ids)
    assert layer.runner.packed.a.data_ptr() == lib.modules[QKV].packed.a.data_ptr() or dtype == torch.float64


def test_raw_experts_are_held_once_by_their_runner():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 24, generator=gen), torch.randn(4, 40, 2, generator=gen)
    from genknowsub_fast.backends.torch_prototypes import exact_prototypes

    experts = ModuleExperts(a, b, torch.full((4,), 2.0), exact_prototypes(a, b)[0], torch.full((4,), 2))
    runner = gkf.ops.prepare(experts, 2, 1.0, "output", dtype=torch.float32)
    assert runner.experts.is_packed and runner.experts.packed is runner.packed
    torch.testing.assert_close(runner.experts.b, b, rtol=0, atol=0)  # b_t / s with s a power of two: exact
    x = torch.randn(5, 24, generator=gen)
    y = gkf.ops.prepare(experts, 2, 1.0, "output")(x)
    torch.testing.assert_close(runner(x), y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- format 1
@pytest.mark.parametrize("name, dtype", [("library_v1_fp32", torch.float32), ("library_v1_bf16", torch.bfloat16)])
def test_format_1_files_written_by_the_previous_version_load(name, dtype):
    """These files were written by the package before format 2 (its LoraLibrary.save of a 3-expert, 2-module library
    with mixed ranks and non-power-of-two scalings). They load packed, with a warning to save them again."""
    path = DATA / f"{name}.safetensors"
    with pytest.warns(UserWarning, match="library format 1"):
        lib = LoraLibrary.load(path)
    assert lib.storage == "memory" and lib.expert_names == ["math", "code", "law"] and lib.dtype == dtype
    with safe_open(str(path), framework="pt") as f:
        for p, m in lib.modules.items():
            raw = ModuleExperts(*(f.get_tensor(f"{p}/{k}") for k in ("A", "B", "scaling", "prototypes", "ranks")))
            assert m.is_packed and torch.equal(m.a, raw.a) and torch.equal(m.ranks, raw.ranks)
            assert torch.equal(m.scaling, raw.scaling) and torch.equal(m.prototypes, raw.prototypes.float())
            # B comes back as b_t / s: one rounding of s·Bᵀ and one of the division
            torch.testing.assert_close(m.b.float(), raw.b.float(), **packed_b(dtype))
            x = torch.randn(7, m.d_in, dtype=dtype, generator=torch.Generator().manual_seed(1))
            options = lib.routing_options(2)
            ours, theirs = RoutedLinear(m, options), RoutedLinear(raw, options)
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)  # the same packing, done at load


def test_format_1_round_trip_through_format_2(built, tmp_path):
    write_format_1(built, tmp_path / "v1.safetensors")
    with pytest.warns(UserWarning, match="library format 1"):
        v1 = LoraLibrary.load(tmp_path / "v1.safetensors")
    v1.save(tmp_path / "v2.safetensors")
    v2 = _load(tmp_path / "v2.safetensors")
    for p, m in built.modules.items():
        for name in ("prototypes", "a", "b_t"):
            assert torch.equal(getattr(v2.modules[p].packed, name), getattr(m.packed, name)), (p, name)


# ----------------------------------------------------------------------------------------------------- bad input
def _rewrite_in_another_process(path, how: str) -> float:
    code = {
        "truncate": f"import os; os.truncate({str(path)!r}, 0)",
        "overwrite": f"f = open({str(path)!r}, 'r+b'); f.seek(8192); f.write(b'\\xff' * (1 << 20)); f.close()",
    }[how]
    proc = subprocess.run([sys.executable, "-c", f"import time; t = time.time(); {code}; print(time.time() - t)"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return float(proc.stdout.strip())


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_mapped_file_rewritten_in_place_keeps_the_loaded_experts(phi3_setup, built, tmp_path, how):
    """Before format 2 nothing was mapped; a mapped file truncated under a process would kill it with SIGBUS at its
    next read. The read lease makes the writer wait until this process has copied its mappings."""
    path = tmp_path / "lib.safetensors"
    built.save(path)
    lib = _load(path)
    model = gkf.patch_model(phi3_setup.fresh(), lib)
    expected = _logits(model, phi3_setup.ids)
    before = {p: m.packed.b_t.clone() for p, m in lib.modules.items()}
    waited = _rewrite_in_another_process(path, how)
    assert waited < 30, "the writer waits for the copy, not for the kernel's lease timeout"
    for p, m in lib.modules.items():
        assert torch.equal(m.packed.b_t, before[p])
    torch.testing.assert_close(_logits(model, phi3_setup.ids), expected, rtol=0, atol=0)
    assert str(path) not in _mapped_files(), "the tensors now live in anonymous memory"
    if how == "truncate":
        assert path.stat().st_size == 0


# A process that holds a library, in the ways a program may hold one; told "check" on stdin, it reads every byte of
# every tensor again and prints whether they are what it read before. A rewrite that reached its mappings would make
# that read die of SIGBUS (truncation) or see other bytes.
_HOLDER = r"""
import os, sys, threading, zlib
import genknowsub_fast as gkf
from genknowsub_fast.library import tensor_file
path, how = sys.argv[1], sys.argv[2]
def load(**kw):
    return gkf.LoraLibrary.load(path, **kw)
if how == "unprotected":  # the control: what happens without the lease
    def no_lease(self):
        self.why_unprotected = "a test"
        return False
    tensor_file.MappedFile.take_lease = no_lease
    libs = [load(mmap=True)]
elif how == "thread":
    libs = []
    t = threading.Thread(target=lambda: libs.append(load()))
    t.start(); t.join()
elif how == "twice":
    libs = [load(), load()]
else:
    libs = [load()]
def sums():
    return [zlib.crc32(getattr(m.packed, n).reshape(-1).view(dtype=__import__("torch").uint8).numpy())
            for lib in libs for m in lib.modules.values() for n in ("prototypes", "a", "b_t")]
before = sums()
child = 0
if how == "fork":
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        same = sums() == before  # the parent reads everything again too
        sys.exit(os.waitstatus_to_exitcode(status) or (0 if same else 3))
print("ready", ";".join(lib.storage for lib in libs), flush=True)
if how == "self":
    os.truncate(path, 0)  # this process rewrites the file it maps, from its main thread
else:
    sys.stdin.readline()
print("same" if sums() == before else "different", flush=True)
"""


def _hold_and_rewrite(path, how: str) -> tuple[str, int, str, float]:
    """(storage, exit status, what the holder saw, seconds the writer waited) of a holder process whose file another
    process truncates."""
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), how], cwd=root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready = holder.stdout.readline().rstrip("\n").split(" ", 1)
        assert ready[0] == "ready", holder.stderr.read()
        waited = 0.0 if how == "self" else _rewrite_in_another_process(path, "truncate")
        with contextlib.suppress(BrokenPipeError):  # a holder that truncates its file itself reads no "check"
            holder.stdin.write("check\n")
            holder.stdin.close()
        holder.wait(timeout=120)
        out, err = holder.stdout.read(), holder.stderr.read()  # the same reader as the first line: nothing lost
    finally:
        if holder.poll() is None:
            holder.kill()
    return ready[1], holder.returncode, out.strip() + err[-2000:], waited


@pytest.mark.parametrize("how", ["main", "thread", "twice", "fork", "self"])
def test_a_holder_reads_every_tensor_after_its_file_is_truncated(built, tmp_path, how):
    """Loaded from the main thread, from another thread, twice, held by a forked child (and its parent), or truncated
    by the holder itself: the writer waits for the copy (not for the kernel's lease-break time), and every tensor
    reads back as it was."""
    path = tmp_path / "lib.safetensors"
    built.save(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, tensor_file.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        pytest.skip(f"no read lease here ({exc})")
    finally:
        os.close(fd)
    storage, status, saw, waited = _hold_and_rewrite(path, how)
    assert set(storage.split(";")) == {"mapped"}, storage
    assert status == 0 and saw.startswith("same"), (status, saw)
    assert waited < 30, "the writer waits for the copy, not for the kernel's lease timeout"
    assert path.stat().st_size == 0


def test_without_the_lease_the_same_truncation_kills_the_holder(built, tmp_path):
    """The control of the test above: an unprotected mapping dies of SIGBUS when it reads the truncated file."""
    path = tmp_path / "lib.safetensors"
    built.save(path)
    storage, status, saw, _ = _hold_and_rewrite(path, "unprotected")
    assert storage == "mapped, unprotected"
    assert status == -signal.SIGBUS, (status, saw)


def test_a_file_rewritten_between_its_header_and_the_lease_is_refused(built, tmp_path, monkeypatch):
    path = tmp_path / "lib.safetensors"
    built.save(path)
    take = tensor_file.MappedFile.take_lease

    def truncate_first(self):
        os.truncate(path, path.stat().st_size // 2)  # a writer that has come and gone before the lease
        return take(self)

    monkeypatch.setattr(tensor_file.MappedFile, "take_lease", truncate_first)
    with pytest.raises(ValueError, match="is truncated"):
        _load(path)


def test_nothing_is_mapped_once_the_file_is_being_rewritten(built, tmp_path):
    """A rewrite that comes while a library is being mapped: what is mapped is copied, and the rest is not mapped
    from a file that no longer holds it."""
    path = tmp_path / "lib.safetensors"
    built.save(path)
    mapped, header = tensor_file.open_for_mapping(str(path))
    try:
        if not mapped.take_lease():
            pytest.skip(f"no read lease here: {mapped.why_unprotected}")
        info = header.tensors[f"{QKV}/b_t"]
        where = (header.data_start + info.begin, info.dtype, info.shape)
        first = mapped.map_tensor(*where)
        before = first.clone()
        os.truncate(path, 0)  # from this thread: the lease's own thread copies the mapping meanwhile
        assert mapped.detached and torch.equal(first, before)
        with pytest.raises(OSError, match="rewritten while it was being mapped") as exc:
            mapped.map_tensor(*where)
        assert exc.value.errno == errno.ESTALE
    finally:
        mapped.finish()


def test_without_a_lease_the_file_is_read_into_memory_or_mapped_when_asked(built, tmp_path, monkeypatch):
    path = tmp_path / "lib.safetensors"
    built.save(path)

    def no_lease(self):
        self.why_unprotected = "no read lease on it (a test)"
        return False

    monkeypatch.setattr(tensor_file.MappedFile, "take_lease", no_lease)
    with pytest.warns(UserWarning, match=r"read into memory instead of mapped: .*\(no read lease on it \(a test\)\)"):
        copied = LoraLibrary.load(path)
    assert copied.storage == "memory" and str(path) not in _mapped_files()
    mapped = LoraLibrary.load(path, mmap=True)
    assert mapped.storage == "mapped, unprotected" and str(path) in _mapped_files()
    quiet = LoraLibrary.load(path, mmap=False)
    assert quiet.storage == "memory"
    for lib in (copied, mapped, quiet):
        assert torch.equal(lib.modules[QKV].packed.b_t, built.modules[QKV].packed.b_t)


def test_truncated_file_is_refused_before_mapping(built, tmp_path):
    path = tmp_path / "lib.safetensors"
    built.save(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf"cannot read library .* is truncated: .* {size} bytes but the file has"):
        LoraLibrary.load(path)


def test_a_library_too_large_for_the_memory_left_is_refused_before_reading(built, tmp_path, monkeypatch):
    path = tmp_path / "lib.safetensors"
    built.save(path)
    monkeypatch.setattr("genknowsub_fast.memory.available_bytes", lambda: 1000)
    monkeypatch.setattr(tensor_file, "read_tensor", lambda *a, **k: pytest.fail("read before the size check"))
    with pytest.raises(ValueError) as exc:
        LoraLibrary.load(path)
    text = str(exc.value)
    assert "\n" not in text and "needs" in text and "but only 1 KB of memory is available" in text, text


def test_patching_that_must_pack_more_than_the_memory_left_is_refused_before_any_layer(phi3_setup, built, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """A float32 library patched into a bfloat16 model packs a bfloat16 copy of its experts: with too little memory
    left, patch_model says so in one line, with the size, and leaves the model as it was."""
    model = phi3_setup.fresh().to(torch.bfloat16)
    monkeypatch.setattr("genknowsub_fast.memory.available_bytes", lambda: 1000)
    with pytest.raises(ValueError) as exc:
        gkf.patch_model(model, built)
    text = str(exc.value)
    need = sum(m.nbytes for m in built.modules.values()) // 2
    assert "\n" not in text and text.startswith(f"patching packs {human_bytes(need)} of experts"), text
    assert "but only 1 KB of memory is available" in text, text
    assert not patched_layers(model)
    monkeypatch.undo()
    assert len(patched_layers(gkf.patch_model(model, built))) == len(built.modules)


# ---------------------------------------------------------------------------------------------- streaming build
@pytest.mark.parametrize(
    "kwargs",
    [
        {"gks": "param"},
        {"gks": "delta"},
        {"gks": "param", "prototypes": "power", "rng_seed": 3},
        {"gks": "param", "prototype_scope": "layer"},
        {"gks": "param", "dtype": torch.bfloat16},
    ],
    ids=["param", "delta", "power", "layer", "bf16"],
)
def test_build_in_chunks_equals_build_in_one_piece(phi3_setup, tmp_path_factory, monkeypatch, kwargs):
    from genknowsub_fast.library import build

    setup = phi3_setup
    if kwargs.get("prototype_scope") == "layer":  # a layer's shared prototype needs modules of one shape
        from genknowsub_fast.synthetic import make_phi2, write_adapters

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup = write_adapters(make_phi2(), tmp_path_factory.mktemp("phi2_attn"), 4, 2,
                                   target_modules=("q_proj", "k_proj", "v_proj", "dense"), seed=4)  # fmt: skip
    whole = LoraLibrary.from_adapters(setup.task, setup.general, **kwargs)
    seen = []
    read = build._read_stacked

    def spy(path, plan, chunk):
        seen.append(len(chunk))
        return read(path, plan, chunk)

    monkeypatch.setattr(build, "CHUNK_BYTES", 1)  # one expert at a time
    monkeypatch.setattr(build, "CHUNK_FRACTION", 0)
    monkeypatch.setattr(build, "_read_stacked", spy)
    pieces = LoraLibrary.from_adapters(setup.task, setup.general, **kwargs)
    assert kwargs["gks"] == "delta" or (seen and max(seen) == 1)
    for p, m in whole.modules.items():
        for name in ("prototypes", "a", "b_t"):
            assert torch.equal(getattr(pieces.modules[p].packed, name), getattr(m.packed, name)), (p, name)


def test_build_into_a_file_holds_one_module_at_a_time(phi3_setup, built, tmp_path, monkeypatch):
    import weakref

    written = []
    write_streamed = file_format.write_streamed

    def spy(path, specs, meta, produce):
        def watched(emit):
            def emit_and_watch(module, experts):
                assert all(ref() is None for ref in written), "an earlier module is still held"
                emit(module, experts)
                written.append(weakref.ref(experts.packed.b_t))

            produce(emit_and_watch)

        write_streamed(path, specs, meta, watched)

    monkeypatch.setattr(file_format, "write_streamed", spy)
    out = tmp_path / "streamed.safetensors"
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, output=out)
    assert len(written) == len(built.modules) and lib.storage in ("mapped", "memory")
    for p, m in built.modules.items():
        for name in ("prototypes", "a", "b_t"):
            assert torch.equal(getattr(lib.modules[p].packed, name), getattr(m.packed, name)), (p, name)


def test_build_shows_a_progress_bar_with_the_time_left(phi3_setup, capsys):
    LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, progress=True)
    err = capsys.readouterr().err
    assert "building library" in err and "<" in err, err  # tqdm's "elapsed<remaining"


def test_a_library_too_large_to_build_is_refused_before_reading(phi3_setup, tmp_path, monkeypatch):
    from genknowsub_fast.library import adapters

    monkeypatch.setattr("genknowsub_fast.memory.available_bytes", lambda: 1000)
    monkeypatch.setattr(adapters.FileTensors, "read_into", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ValueError, match=r"^the library needs \d+ KB, but only 1 KB of memory is available; build it"):
        LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ValueError, match="needs .* but only 1 KB of disk space is free"):
        LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, output=tmp_path / "x.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_experts_are_copied_once_and_the_host_mapping_goes_with_the_library(phi3_setup, built, tmp_path):
    import gc

    path = tmp_path / "lib.safetensors"
    built.save(path)
    lib = _load(path)
    model = gkf.patch_model(phi3_setup.fresh().cuda(), lib, backend="torch")
    for layer in patched_layers(model).values():
        assert layer.runner.experts.device.type == "cuda" and layer.runner.experts.packed is layer.runner.packed
    expected = _logits(gkf.patch_model(phi3_setup.fresh(), built), phi3_setup.ids)
    assert str(path) in _mapped_files(), "the caller keeps the library, so its host copy stays"
    del lib
    gc.collect()
    assert str(path) not in _mapped_files()
    torch.testing.assert_close(_logits(model, phi3_setup.ids.cuda()).cpu(), expected, **FP32_SAME_MATH)
