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


def test_make_tokenizer_is_local_and_fits_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from genknowsub_fast.synthetic import CHAT_TOKENS, make_tokenizer

    tok = make_tokenizer(128)
    assert len(tok) <= 128
    ids = tok("question: the cat<|end|>")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.convert_tokens_to_ids("<|end|>") in ids
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in CHAT_TOKENS)
    assert make_tokenizer(128, add_bos=False)("the cat")["input_ids"][0] != 1
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("the cat")["input_ids"] == tok("the cat")["input_ids"]


def test_make_choice_examples_are_seeded_and_valid():
    from genknowsub_fast.evaluate.formats import check_examples
    from genknowsub_fast.synthetic import make_choice_examples

    a, b = make_choice_examples(5, num_choices=3, seed=4), make_choice_examples(5, num_choices=3, seed=4)
    assert a == b and a != make_choice_examples(5, num_choices=3, seed=5)
    check_examples(a, need_labels=True)
    assert all(len(e["choices"]) == 3 and all(c.startswith(" ") for c in e["choices"]) for e in a)
