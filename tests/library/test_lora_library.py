"""LoraLibrary: GKS modes against reference.py, prototypes, save/load, PEFT models, and bad input."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from genknowsub_fast import LoraLibrary, reference
from genknowsub_fast.library.adapters import read_adapter
from genknowsub_fast.options import RoutingOptions
from genknowsub_fast.synthetic import make_phi3, write_adapters
from tests.library.format_1 import write_format_1
from tests.tolerances import FP32_PRODUCT, PROTOTYPE_MIN_COS

QKV = "model.layers.0.self_attn.qkv_proj"


def test_param_gks_matches_reference(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    tasks = [read_adapter(p) for p in phi3_setup.task]
    gen = [read_adapter(p) for p in phi3_setup.general]
    for path, m in lib.modules.items():
        ref = reference.gks_param([(t.a[path], t.b[path]) for t in tasks], [(g.a[path], g.b[path]) for g in gen])
        for i, (a, b) in enumerate(ref):
            torch.testing.assert_close(m.a[i], a)
            torch.testing.assert_close(m.b[i], b)
        assert m.scaling.tolist() == [t.scaling[path] for t in tasks]
    assert lib.gks == "param" and lib.general_names == ["general_0", "general_1", "general_2"]
    assert lib.expert_names == [f"task_{i}" for i in range(5)]


def test_no_general_adapters_means_no_gks(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    assert lib.gks is None
    torch.testing.assert_close(lib.modules[QKV].a[2], read_adapter(phi3_setup.task[2]).a[QKV])


def test_exact_prototypes_match_svd(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    for m in lib.modules.values():
        ref = reference.prototypes_svd(m.a.double(), m.b.double())
        assert float((m.prototypes.double() * ref).sum(1).abs().min()) >= PROTOTYPE_MIN_COS


def test_power_prototypes_are_close_on_decaying_spectra(phi3_setup):
    exact = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    power = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, prototypes="power", rng_seed=0)
    assert power.prototype_method == "power"
    for p, m in exact.modules.items():
        assert float((m.prototypes * power.modules[p].prototypes).sum(1).abs().min()) > 0.9999


@pytest.fixture(scope="module")
def mixed_rank_adapters(tmp_path_factory):
    base = make_phi3("tiny")
    out = tmp_path_factory.mktemp("mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, out, 3, 2, rank=3, task_ranks=[2, 4, 3], seed=4)
    return base, ad


def test_delta_gks_with_mixed_ranks_matches_reference(mixed_rank_adapters):
    _, ad = mixed_rank_adapters
    lib = LoraLibrary.from_adapters(ad.task, ad.general, gks="delta")
    tasks = [read_adapter(p) for p in ad.task]
    gen = [read_adapter(p) for p in ad.general]
    m = lib.modules[QKV]
    ref = reference.gks_delta(
        [(t.a[QKV].double(), t.b[QKV].double(), t.scaling[QKV]) for t in tasks],
        [(g.a[QKV].double(), g.b[QKV].double(), g.scaling[QKV]) for g in gen],
    )
    assert m.ranks.tolist() == [2 + 6, 4 + 6, 3 + 6] and m.a.shape[1] == 10
    assert m.scaling.tolist() == [1.0, 1.0, 1.0]
    for i, (a, b, _) in enumerate(ref):
        torch.testing.assert_close((m.b[i] @ m.a[i]).double(), b @ a, **FP32_PRODUCT)
        r = m.ranks[i]
        assert torch.all(m.a[i, r:] == 0) and torch.all(m.b[i, :, r:] == 0)


def test_param_gks_with_mixed_ranks_is_refused(mixed_rank_adapters):
    _, ad = mixed_rank_adapters
    with pytest.raises(ValueError, match='gks="delta"'):
        LoraLibrary.from_adapters(ad.task, ad.general, gks="param")


def test_save_load_round_trip(phi3_setup, tmp_path):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, names=list("abcde"))
    lib.save(tmp_path / "lib.safetensors")
    back = LoraLibrary.load(tmp_path / "lib.safetensors")
    assert back.expert_names == list("abcde") and back.gks == "param"
    assert back.general_names == lib.general_names and back.base_model_class == "Phi3ForCausalLM"
    assert list(back.modules) == list(lib.modules)
    for p, m in lib.modules.items():
        for field in ("a", "b", "scaling", "prototypes", "ranks"):
            assert torch.equal(getattr(m, field), getattr(back.modules[p], field))
    assert "5 experts" in repr(back) and "gks='param'" in repr(back)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a genknowsub_fast library"):
        LoraLibrary.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="cannot read library"):
        LoraLibrary.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="is a directory$"):
        LoraLibrary.load(tmp_path)


def test_an_adapter_directory_given_as_a_library_is_named_so(phi3_setup):
    with pytest.raises(ValueError, match=r"is a directory \(an adapter directory: build a library from it"):
        LoraLibrary.load(phi3_setup.task[0])


def test_a_single_path_instead_of_a_list_is_refused(phi3_setup):
    """A string is a sequence: it used to be read character by character ("adapter path 'a' does not exist")."""
    with pytest.raises(ValueError, match="task_adapters must be a list of adapter directories, got the single path"):
        LoraLibrary.from_adapters(phi3_setup.task[0])
    with pytest.raises(ValueError, match="general_adapters must be a list"):
        LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general[0])


def test_routing_options_are_the_librarys_else_min_3_e(phi3_setup):
    two = LoraLibrary.from_adapters(phi3_setup.task[:2])
    assert two.routing_options() == RoutingOptions(2, 1.0, "output")
    n = len(phi3_setup.task)
    assert LoraLibrary.from_adapters(phi3_setup.task).routing_options() == RoutingOptions(min(3, n), 1.0, "output")
    two.routing = {"top_k": 1, "temperature": 0.5}  # carried from a PEFT Arrow model
    assert two.routing_options() == RoutingOptions(1, 0.5)
    assert two.routing_options(2, None) == RoutingOptions(2, 0.5)  # given ones kept
    assert two.routing_options(None, 2.0, "weights") == RoutingOptions(1, 2.0, "weights")
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 2\]"):
        two.routing_options(3)


def test_to_dtype(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, dtype=torch.bfloat16)
    assert lib.dtype == torch.bfloat16 and lib.modules[QKV].scaling.dtype == torch.float32
    assert lib.to(dtype=torch.float32).dtype == torch.float32


def test_bad_inputs(phi3_setup, tmp_path):
    with pytest.raises(ValueError, match="at least one task adapter"):
        LoraLibrary.from_adapters([])
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary.from_adapters([tmp_path / "nope"])
    with pytest.raises(ValueError, match="gks must be"):
        LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks="mean")
    with pytest.raises(ValueError, match="prototypes must be"):
        LoraLibrary.from_adapters(phi3_setup.task, prototypes="random")
    with pytest.raises(ValueError, match=r"1 names \(command line: --names\) given for 5 task adapters"):
        LoraLibrary.from_adapters(phi3_setup.task, names=["a"])


def test_adapters_for_another_base_model(phi3_setup, phi2_setup, tmp_path):
    with pytest.raises(ValueError, match="different base models"):
        LoraLibrary.from_adapters([phi3_setup.task[0], phi2_setup.task[0]], names=["phi3", "phi2"])
    other = shutil.copytree(phi3_setup.task[1], tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/some-other-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    first = shutil.copytree(phi3_setup.task[0], tmp_path / "first")
    cfg["base_model_name_or_path"] = "microsoft/Phi-3-mini-4k-instruct"
    (first / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different base models"):
        LoraLibrary.from_adapters([first, other])


def test_zero_expert_warns(phi3_setup, tmp_path):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(phi3_setup.task[0], tmp_path / "zero")
    state = {
        k: torch.zeros_like(v) if "lora_B" in k else v for k, v in load_file(d / "adapter_model.safetensors").items()
    }
    save_file(state, d / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="ΔW = 0"):
        lib = LoraLibrary.from_adapters([d] + phi3_setup.task[1:])
    assert torch.all(lib.modules[QKV].prototypes[0] == 0)


def test_from_peft_model_before_and_after_peft_applied_gks(phi3_setup):
    from peft import ArrowConfig, create_arrow_model

    expected = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = create_arrow_model(
            copy.deepcopy(phi3_setup.base),
            phi3_setup.task,
            ArrowConfig(top_k=2, router_temperature=0.5, use_gks=True),
            phi3_setup.general,
        )
    before = LoraLibrary.from_peft_model(pm)
    with torch.no_grad():
        pm(phi3_setup.ids)  # PEFT subtracts the general mean in place on the first forward
    after = LoraLibrary.from_peft_model(pm)
    for lib in (before, after):
        assert lib.gks == "param" and lib.routing == {"top_k": 2, "temperature": 0.5}
        for p, m in expected.modules.items():
            torch.testing.assert_close(lib.modules[p].a, m.a)
            torch.testing.assert_close(lib.modules[p].b, m.b)


def test_from_peft_model_needs_an_arrow_model(phi3_setup):
    with pytest.raises(ValueError, match="no PEFT Arrow layers"):
        LoraLibrary.from_peft_model(phi3_setup.base)


# ------------------------------------------------------------------------- library files: validation on load
def _rewrite(src, dst, edit_tensors=None, edit_meta=None, raw_meta=None):
    """Copy library file ``src`` to ``dst`` with its tensors and/or metadata edited (as a user editing a file would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        tensors = {k: f.get_tensor(k) for k in names}
        meta = json.loads(f.metadata()["genknowsub_fast"])
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_meta is not None:
        edit_meta(meta)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata={"genknowsub_fast": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


@pytest.fixture(scope="module", params=[1, 2], ids=["format1", "format2"])
def lib_file(request, phi3_setup, tmp_path_factory):
    """A library file in format version 2 (what save writes) and version 1 (what earlier versions wrote)."""
    path = tmp_path_factory.mktemp("libfile") / "lib.safetensors"
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    if request.param == 1:
        write_format_1(lib, path)
    else:
        lib.save(path)
    return path


# The tensors the edits below name, in each format: version 2 stores A as "a" and s·Bᵀ (E, r, row stride) as "b_t".
_NAMES = {1: {"A": "A", "B": "B"}, 2: {"A": "a", "B": "b_t"}}


def _version(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["genknowsub_fast"])["format_version"]


def _drop_last_rank(x):
    """B (E, d_out, r) loses its last rank column; b_t (E, r, row stride) its last rank row."""
    return x[:, :, :-1] if x.shape[1] > x.shape[2] else x[:, :-1]


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])

    return edit


def _row0(fn):
    def edit(x):
        x = x.clone()
        x[0] = fn(x[0])
        return x

    return edit


O_PROJ = "model.layers.0.self_attn.o_proj"


@pytest.mark.parametrize(
    "module, tensor, edit, message",
    [
        (QKV, "scaling", _row0(lambda v: v * float("nan")), "NaN or Inf"),
        (QKV, "A", lambda x: (x * 100).to(torch.int32), "dtype torch.int32"),
        (QKV, "ranks", lambda x: x.to(torch.int32), "dtype torch.int32"),
        (QKV, "scaling", lambda x: x.double(), "dtype torch.float64"),
        (O_PROJ, "prototypes", _row0(torch.zeros_like), "rows [0] are zero"),
        (O_PROJ, "prototypes", _row0(lambda v: 2 * v), "unit vectors"),
        (O_PROJ, "prototypes", _row0(lambda v: 0.5 * v), "unit vectors"),
        (QKV, "ranks", _row0(lambda v: v * 0 - 1), "must be in [1, 4]"),
        (QKV, "ranks", _row0(lambda v: v * 0 + 99), "must be in [1, 4]"),
        (QKV, "B", _drop_last_rank, "has shape"),
        (QKV, "prototypes", lambda x: x[:-1], "has shape"),
    ],
)
def test_edited_library_tensors_are_refused_naming_file_and_tensor(lib_file, tmp_path, module, tensor, edit, message):
    """Before the fix the loader checked only that A, B and the prototypes were finite, so every one
    of these files loaded (a NaN scaling then gave NaN logits)."""
    tensor = _NAMES[_version(lib_file)].get(tensor, tensor)
    bad = _rewrite(lib_file, tmp_path / "edited.safetensors", _set(f"{module}/{tensor}", edit))
    with pytest.raises(ValueError) as exc:
        LoraLibrary.load(bad)
    text = str(exc.value)
    assert str(bad) in text and f"{module}/{tensor}'" in text and message in text, text


def test_non_zero_padding_is_refused(lib_file, tmp_path):
    """an expert's rank lowered to 3 of r_max 4 leaves a non-zero 4th row of A, which must be padding."""
    bad = _rewrite(lib_file, tmp_path / "edited.safetensors", _set(f"{QKV}/ranks", _row0(lambda v: v - 1)))
    a = _NAMES[_version(lib_file)]["A"]
    with pytest.raises(ValueError, match=f"{QKV}/{a}' has non-zero padding rows"):
        LoraLibrary.load(bad)


def _names(fn):
    def edit(meta):
        meta["expert_names"] = fn(meta["expert_names"])

    return edit


def _drop(key):
    def edit(t):
        del t[key]

    return edit


@pytest.mark.parametrize(
    "tensors, meta, raw, message",
    [
        (None, _names(lambda n: ["a", "a", *n[2:]]), None, "duplicates: ['a']"),
        (None, _names(lambda n: n[:-1]), None, "has shape"),
        (None, None, "{not json", "metadata is not valid JSON"),
        (None, None, "[1, 2]", "metadata is not a JSON object"),
        (None, lambda m: m.update(gks="mean"), None, "gks must be"),
        (None, lambda m: m.update(routing={"top_k": 9}), None, "top_k"),
        (None, lambda m: m.update(module_paths=[QKV, QKV]), None, "module_paths has duplicates"),
        (None, lambda m: m.pop("expert_names"), None, "no 'expert_names'"),
        (_drop(f"{QKV}/ranks"), None, None, f"tensor '{QKV}/ranks' is missing"),
        (lambda t: t.update(extra=torch.zeros(1)), None, None, "unexpected tensor 'extra'"),
    ],
)
def test_edited_library_metadata_is_refused_naming_the_file(lib_file, tmp_path, tensors, meta, raw, message):
    """Before the fix duplicate names, a wrong routing entry or extra tensors loaded silently, a
    missing tensor raised a bare safetensors error and garbage metadata a bare JSONDecodeError."""
    bad = _rewrite(lib_file, tmp_path / "edited.safetensors", tensors, meta, raw)
    with pytest.raises(ValueError) as exc:
        LoraLibrary.load(bad)
    assert str(bad) in str(exc.value) and message in str(exc.value), str(exc.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("prototypes", ["exact", "power"])
def test_every_library_we_write_passes_the_load_checks(phi3_setup, tmp_path, dtype, prototypes):
    """The checks refuse edits, not our own files: every dtype and prototype method round-trips bit for bit."""
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, prototypes=prototypes, rng_seed=0, dtype=dtype)
    lib.save(tmp_path / "lib.safetensors")
    back = LoraLibrary.load(tmp_path / "lib.safetensors")
    for p, m in lib.modules.items():
        assert torch.equal(back.modules[p].prototypes, m.prototypes) and back.modules[p].a.dtype == dtype


def test_zero_expert_library_round_trips(phi3_setup, tmp_path):
    """A zero prototype is legal exactly when the expert's ΔW is zero (here via delta GKS of an adapter minus itself:
    non-zero factors whose product cancels)."""
    same = shutil.copytree(phi3_setup.task[0], tmp_path / "same_as_task_0")
    with pytest.warns(UserWarning, match="ΔW = 0"):
        lib = LoraLibrary.from_adapters(phi3_setup.task[:2], [same], gks="delta")
    assert torch.all(lib.modules[QKV].prototypes[0] == 0) and bool((lib.modules[QKV].a[0] != 0).any())
    lib.save(tmp_path / "zero.safetensors")
    back = LoraLibrary.load(tmp_path / "zero.safetensors")
    assert torch.equal(back.modules[QKV].prototypes, lib.modules[QKV].prototypes)


# ------------------------------------------------------------------------------------------ writing library files
def test_library_file_follows_the_umask(phi3_setup, tmp_path):
    """safetensors' save_file leaves 0o600 whatever the umask; the file must get 0o666 & ~umask."""
    import os
    import stat

    lib = LoraLibrary.from_adapters(phi3_setup.task[:2])
    old = os.umask(0o022)
    try:
        lib.save(tmp_path / "a.safetensors")
        os.umask(0o077)
        lib.save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left


def test_failed_save_leaves_the_old_file(phi3_setup, tmp_path, monkeypatch):
    """The file is written under a temporary name and renamed: a write that fails half-way leaves the old file whole
    and no temporary behind."""
    import genknowsub_fast.library.file_format as library_module

    lib = LoraLibrary.from_adapters(phi3_setup.task[:2])
    path = tmp_path / "lib.safetensors"
    lib.save(path)
    before = path.read_bytes()
    write_at = library_module.write_at
    written = []

    def half_write(fd, offset, tensor):
        if written:  # the first tensor is written, then the disk is full
            raise OSError(28, "No space left on device")
        write_at(fd, offset, tensor)
        written.append(offset)

    monkeypatch.setattr(library_module, "write_at", half_write)
    with pytest.raises(OSError, match="No space left"):
        lib.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lib.safetensors"]


def test_save_to_a_missing_directory_or_a_directory_is_a_value_error(phi3_setup, tmp_path):
    lib = LoraLibrary.from_adapters(phi3_setup.task[:2])
    with pytest.raises(ValueError, match="does not exist"):
        lib.save(tmp_path / "missing" / "lib.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        lib.save(tmp_path)


# --------------------------------------------------------------------------------------------- len, dtypes
def test_len_counts_experts(phi3_setup):
    """len(lib) counted modules (8 here) where users expect the experts (5)."""
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    assert len(lib) == lib.num_experts == 5 and len(lib.modules) == 8


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, "float32"])
def test_non_float_library_dtypes_are_refused(phi3_setup, dtype, monkeypatch):
    """from_adapters(dtype=torch.int8) and lib.to(dtype=torch.int8) zeroed every expert. The
    from_adapters check must come before any adapter is read."""
    import genknowsub_fast.library.build as library_module

    lib = LoraLibrary.from_adapters(phi3_setup.task[:2])
    with pytest.raises(ValueError, match="dtype"):
        lib.to(dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        lib.modules[QKV].to(dtype=dtype)

    def no_reading(*args, **kwargs):
        raise AssertionError("adapters were read before the dtype was checked")

    monkeypatch.setattr(library_module, "read_adapter", no_reading)
    with pytest.raises(ValueError, match="dtype"):
        LoraLibrary.from_adapters(phi3_setup.task[:2], dtype=dtype)


# ------------------------------------------------------------------------------------ duplicate experts
def test_duplicate_experts_are_refused_before_reading(phi3_setup, tmp_path, monkeypatch):
    """the same directory twice, two directories with one name, and names=["a", "a"] were accepted."""
    import genknowsub_fast.library.build as library_module

    t = phi3_setup.task
    other = shutil.copytree(t[1], tmp_path / "elsewhere" / "task_0")  # another directory named like t[0]
    link = tmp_path / "link"
    link.symlink_to(t[0])

    def no_reading(*args, **kwargs):
        raise AssertionError("adapters were read before duplicates were checked")

    monkeypatch.setattr(library_module, "read_adapter", no_reading)
    for args, kwargs, match in (
        ([[t[0], t[1], t[0]]], {}, "given twice among the task adapters"),
        ([[t[0], link]], {"names": ["a", "b"]}, "given twice"),
        ([t[:2], [t[1]]], {}, "given twice"),
        ([t[:2]], {"names": ["a", "a"]}, r"names \(command line: --names\) has duplicates: \['a'\]"),
        (
            [t[:2], t[2:4]],
            {"general_names": ["g", "g"]},
            r"general_names \(command line: --general-names\) has duplicates: \['g'\]",
        ),
        (
            [t[:2], [t[2]]],
            {"add_adapters": t[3:5], "add_names": ["u", "u"]},
            r"add_names \(command line: --add-names\) has duplicates",
        ),
        (
            [t[:2], t[2:4]],
            {"general_names": ["g"]},
            r"1 general_names \(command line: --general-names\) given for 2 general adapters",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            LoraLibrary.from_adapters(*args, **kwargs)
    monkeypatch.undo()
    lib = LoraLibrary.from_adapters([t[0], other], names=["first", "second"])
    assert lib.expert_names == ["first", "second"]
    # Two directories called task_0 are told apart by their parents.
    lib = LoraLibrary.from_adapters([t[0], other])
    assert lib.expert_names == [f"{Path(t[0]).parent.name}/task_0", "elsewhere/task_0"]


def test_from_loaded_refuses_duplicate_names(phi3_setup):
    tasks = [read_adapter(p) for p in phi3_setup.task[:2]]
    tasks[1].name = tasks[0].name
    with pytest.raises(ValueError, match="duplicates"):
        LoraLibrary.from_loaded(tasks, gks=None)


# ------------------------------------------------------------------------ one base model named two ways
def _with_base_name(src, dst, name):
    d = shutil.copytree(src, dst)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = name
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_base_model_named_two_ways(phi3_setup, tmp_path):
    """a hub id and a local path of one model could not be combined. A Hugging Face cache snapshot path
    now matches its hub id by itself; any other pair needs base_model_name=, which is then recorded in the file."""
    hub = _with_base_name(phi3_setup.task[0], tmp_path / "hub", "microsoft/Phi-3-mini-4k-instruct")
    snapshot = "/cache/hub/models--microsoft--Phi-3-mini-4k-instruct/snapshots/0a67737cc96d2554230f90338b163bc6380a2a85"
    snap = _with_base_name(phi3_setup.task[1], tmp_path / "snap", snapshot)
    local = _with_base_name(phi3_setup.task[2], tmp_path / "local", "/models/phi3-mini")
    lib = LoraLibrary.from_adapters([hub, snap])
    assert lib.base_model_name == "microsoft/Phi-3-mini-4k-instruct"
    with pytest.raises(ValueError, match="different base models.*base_model_name="):
        LoraLibrary.from_adapters([hub, local])
    lib = LoraLibrary.from_adapters([hub, local], base_model_name="microsoft/Phi-3-mini-4k-instruct")
    lib.save(tmp_path / "lib.safetensors")
    assert LoraLibrary.load(tmp_path / "lib.safetensors").base_model_name == "microsoft/Phi-3-mini-4k-instruct"
    with pytest.raises(ValueError, match="base_model_name must be"):
        LoraLibrary.from_adapters([hub, local], base_model_name="")


def test_base_model_name_does_not_skip_the_shape_checks(phi3_setup, phi2_setup):
    with pytest.raises(ValueError, match="different base models"):
        LoraLibrary.from_adapters([phi3_setup.task[0], phi2_setup.task[0]], names=["a", "b"], base_model_name="x")


# --------------------------------------------------------------------------------------- modules_to_save
@pytest.fixture(scope="module")
def lm_head_adapters(tmp_path_factory):
    """Two adapters that, besides LoRA on the attention projections, save a full fine-tuned lm_head."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("mts")
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        targets = ["qkv_proj", "o_proj"]
        cfg = LoraConfig(r=4, target_modules=targets, modules_to_save=["lm_head"], init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(make_phi3("tiny"), cfg)
        pm.save_pretrained(out / f"head_{i}")
        dirs.append(out / f"head_{i}")
    return dirs


def test_modules_to_save_can_be_ignored_with_a_notice(lm_head_adapters):
    """adapters with modules_to_save tensors were refused with no way around it."""
    with pytest.raises(ValueError, match="modules_to_save.*ignore_modules_to_save=True"):
        LoraLibrary.from_adapters(lm_head_adapters)
    with pytest.warns(UserWarning, match=r"modules_to_save\) of 2 adapter\(s\) for \['lm_head'\]") as rec:
        lib = LoraLibrary.from_adapters(lm_head_adapters, ignore_modules_to_save=True)
    assert len([w for w in rec if "modules_to_save" in str(w.message)]) == 1
    assert lib.num_experts == 2 and all(not p.endswith("lm_head") for p in lib.modules)
    assert sorted(lib.target_modules) == ["o_proj", "qkv_proj"]
