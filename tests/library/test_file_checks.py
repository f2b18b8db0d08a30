"""library_checks: the validators LoraLibrary.load runs, on hand-made tensors (whole files: test_library.py)."""

import pytest
import torch

from genknowsub_fast.library.file_checks import (
    check_metadata,
    check_module_tensors,
    check_names,
    check_tensor_keys,
    prototype_tolerance,
)


def _tensors(e=3, r=2, d_in=16, d_out=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(e, r, d_in, generator=gen)
    b = torch.randn(e, d_out, r, generator=gen)
    from genknowsub_fast.backends.torch_prototypes import exact_prototypes

    protos, _ = exact_prototypes(a, b)
    return {"A": a, "B": b, "scaling": torch.ones(e), "prototypes": protos, "ranks": torch.full((e,), r)}


def test_valid_tensors_pass_and_keep_their_values():
    t = _tensors()
    m = check_module_tensors(t, 3, "exact", "w: tensor 'm")
    assert m.a is t["A"] and m.ranks is t["ranks"]


def test_zero_prototype_only_for_a_zero_delta():
    t = _tensors()
    t["prototypes"] = t["prototypes"].clone()
    t["prototypes"][1] = 0
    with pytest.raises(ValueError, match=r"w: tensor 'm/prototypes' rows \[1\] are zero"):
        check_module_tensors(t, 3, "exact", "w: tensor 'm")
    t["B"] = t["B"].clone()
    t["B"][1] = 0
    check_module_tensors(t, 3, "exact", "w: tensor 'm")


def test_power_prototypes_may_be_shorter_than_one():
    """PEFT's power iteration divides by (norm + 1e-8), so a tiny ΔW gives a prototype slightly shorter than 1."""
    t = _tensors()
    t["prototypes"] = t["prototypes"] * 0.9
    with pytest.raises(ValueError, match="unit vectors"):
        check_module_tensors(t, 3, "exact", "w: tensor 'm")
    check_module_tensors(t, 3, "power", "w: tensor 'm")
    t["prototypes"] = t["prototypes"] / 0.9 * 1.1
    with pytest.raises(ValueError, match="unit vectors"):
        check_module_tensors(t, 3, "power", "w: tensor 'm")


def test_non_zero_padding_columns_of_b():
    t = _tensors()
    t["ranks"] = torch.tensor([2, 1, 2])
    t["A"] = t["A"].clone()
    t["A"][1, 1] = 0
    with pytest.raises(ValueError, match="'m/B' has non-zero padding columns"):
        check_module_tensors(t, 3, "exact", "w: tensor 'm")


def test_tolerance_per_dtype():
    assert prototype_tolerance(torch.float32) == prototype_tolerance(torch.float64) == 1e-4
    assert prototype_tolerance(torch.bfloat16) == 4 * 2**-7 and prototype_tolerance(torch.float16) == 4 * 2**-10


def test_names():
    assert check_names(["a", "b"], "x") == ["a", "b"]
    for bad, match in ((["a", "a"], "duplicates"), ([], "empty"), (["a", ""], "non-empty"), ("ab", "list")):
        with pytest.raises(ValueError, match=match):
            check_names(bad, "x")
    assert check_names([], "x", allow_empty=True) == []


def test_metadata_routing_and_keys():
    meta = {"expert_names": ["a", "b"], "module_paths": ["m"], "routing": {"top_k": 2, "temperature": 0.5}}
    assert check_metadata(meta, "w") is meta
    for routing, match in (({"top_k": 3}, "top_k"), ({"top_k": True}, "top_k"), ({"temperature": 0}, "temperature")):
        with pytest.raises(ValueError, match=match):
            check_metadata({**meta, "routing": routing}, "w")
    with pytest.raises(ValueError, match="base_model_name must be a string"):
        check_metadata({**meta, "base_model_name": 3}, "w")
    check_tensor_keys([f"m/{k}" for k in ("A", "B", "scaling", "prototypes", "ranks")], ["m"], "w")
    with pytest.raises(ValueError, match="'m/ranks' is missing"):
        check_tensor_keys([f"m/{k}" for k in ("A", "B", "scaling", "prototypes")], ["m"], "w")
