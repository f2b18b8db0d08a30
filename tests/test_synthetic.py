"""synthetic: the random models' sizes are known before they are built."""

import pytest

from genknowsub_fast import memory, synthetic


def test_parameter_count_matches_the_built_model():
    model = synthetic.make_phi3("tiny")
    assert synthetic.phi3_num_parameters("tiny") == sum(p.numel() for p in model.parameters())


def test_check_phi3_fits_says_the_cost_and_refuses_too_much(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000_000_000)
    assert synthetic.check_phi3_fits("small") == "random Phi-3 'small': 1.6 M parameters, 6 MB in float32"
    with pytest.raises(ValueError, match=r"3.82 B parameters, 30.6 GB in float32 for 2 copies, but only 10.0 GB"):
        synthetic.check_phi3_fits("phi3-mini", copies=2)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: no refusal
    assert "15.3 GB" in synthetic.check_phi3_fits("phi3-mini")
    with pytest.raises(ValueError, match="unknown size"):
        synthetic.check_phi3_fits("huge")
