"""score_choices: the batched shared-prefix scorer equals the naive per-option loop (tolerance table), reductions."""

import copy

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast.evaluate import (
    TEMPLATES,
    OptionTokens,
    accuracy,
    predictions,
    reduce_nll,
    score_choices,
    score_choices_naive,
    tokenize_options,
)
from genknowsub_fast.synthetic import make_choice_examples, make_tokenizer
from tests.tolerances import FP32_SCORES_SAME_MATH, assert_close_to_reference


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(128)


@pytest.fixture(scope="module")
def library(phi3_setup):
    return gkf.LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks="param")


def _patched(phi3_setup, library, dtype=torch.float32):
    return gkf.patch_model(phi3_setup.fresh().to(dtype), library, top_k=2)


def _examples():
    ex = make_choice_examples(7, num_choices=4, seed=3)
    ex[1].update(choices=ex[1]["choices"][:2], label=1)  # groups of different sizes
    ex[2].update(choices=[" big", " big tree", " big tree house"], label=0)  # options sharing tokens past the context
    return ex


@pytest.mark.parametrize("template", ["plain", "phi3-chat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_scores_equal_the_naive_loop(phi3_setup, library, tokenizer, template, dtype):
    examples = _examples()
    model = _patched(phi3_setup, library, dtype)
    model64 = _patched(phi3_setup, library, torch.float64)
    # The other reductions divide the same continuation sum by a count (test_reductions).
    for reduction in ("mean", "sum_continuation"):
        ours = score_choices(model, tokenizer, examples, template=template, reduction=reduction, batch_size=6)
        naive = score_choices_naive(model, tokenizer, examples, template=template, reduction=reduction)
        ref64 = score_choices_naive(model64, tokenizer, examples, template=template, reduction=reduction)
        flat = [torch.tensor([v for row in s for v in row], dtype=torch.float64) for s in (ours, naive, ref64)]
        assert_close_to_reference(flat[0], flat[2], flat[1], dtype, f"{template} {reduction} {dtype}")
        if dtype == torch.float32:
            assert predictions(ours) == predictions(ref64)


def test_batch_size_does_not_change_the_scores(phi3_setup, library, tokenizer):
    """batch_size 1 (one option per pass), 3 (a 4-option example split over passes on copies of its cache), 64."""
    examples = _examples()
    model = _patched(phi3_setup, library)
    scores = [score_choices(model, tokenizer, examples, batch_size=b) for b in (1, 3, 64)]
    flat = [torch.tensor([v for row in s for v in row], dtype=torch.float64) for s in scores]
    for other in flat[1:]:
        assert_close_to_reference(other, flat[0], flat[0], torch.float32, "batch size")


def test_the_prefix_runs_once_per_example(phi3_setup, library, tokenizer):
    examples = make_choice_examples(6, num_choices=4, seed=5)
    model = _patched(phi3_setup, library)
    fed = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: fed.append(int(kw["input_ids"].ne(0).sum())), with_kwargs=True
    )
    try:
        score_choices(model, tokenizer, examples, batch_size=64)
        ours = sum(fed)
        fed.clear()
        score_choices_naive(model, tokenizer, examples)
        naive = sum(fed)
    finally:
        hook.remove()
    plans = tokenize_options(tokenizer, examples, "plain")
    context = sum(o.continuation_start for opts in plans for o in opts[:1])  # >= the shared prefix, per example
    assert ours < naive - 3 * context  # each of the 4 options would have run the context again


def test_mean_is_the_causal_lm_loss_of_the_whole_sequence(phi3_setup, library, tokenizer):
    """The original's score: HF's mean token loss of the formatted option (BOS included, first token unscored)."""
    ex = make_choice_examples(2, seed=1)
    model = _patched(phi3_setup, library)
    scores = score_choices(model, tokenizer, ex, template="phi3-chat", reduction="mean")
    for e, row in zip(ex, scores):
        for choice, s in zip(e["choices"], row):
            text = f"<|user|>\n{e['context']}<|end|>\n<|assistant|>{choice}<|end|>\n"
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            assert ids[0, 0] == tokenizer.bos_token_id
            with torch.no_grad():
                loss = float(model(input_ids=ids, labels=ids).loss)
            tol = FP32_SCORES_SAME_MATH
            assert s == pytest.approx(loss, rel=tol["rtol"], abs=tol["atol"])


def test_no_shared_prefix(phi3_setup, library):
    """Without BOS and with an empty context the options differ at their first token: no prefix pass."""
    tok = make_tokenizer(128, add_bos=False)
    ex = [{"context": "", "choices": ["whale big", "cat", "dog sat on the mat"], "label": 0}]
    ex += make_choice_examples(3, seed=2)
    model = _patched(phi3_setup, library)
    ours = score_choices(model, tok, ex, reduction="mean", batch_size=4)
    naive = score_choices_naive(model, tok, ex, reduction="mean")
    flat = [torch.tensor([v for row in s for v in row], dtype=torch.float64) for s in (ours, naive)]
    assert_close_to_reference(flat[0], flat[1], flat[1], torch.float32, "no shared prefix")


def test_phi3_chat_is_the_original_format():
    text = TEMPLATES["phi3-chat"].replace("{context}", "Q?").replace("{choice}", "A")
    assert text == "<|user|>\nQ?<|end|>\n<|assistant|>A<|end|>\n"


def test_continuation_is_lm_evals_split_without_boundary_merges(tokenizer):
    ex = make_choice_examples(5, seed=4)
    for e, opts in zip(ex, tokenize_options(tokenizer, ex, "plain")):
        context_ids = tokenizer(e["context"])["input_ids"]
        for choice, o in zip(e["choices"], opts):
            assert o.ids == tokenizer(e["context"] + choice)["input_ids"]
            assert o.continuation_start == len(context_ids)  # lm-eval: whole[len(encode(context)):]
            assert o.choice_chars == len(choice)


def test_a_token_merged_across_the_boundary_counts_as_continuation(tokenizer):
    # "...the wh" + "ale": the whole option tokenizes "▁whale" as one token, the context alone ends in pieces.
    ex = [{"context": "the big wh", "choices": ["ale", "at"]}]
    opts = tokenize_options(tokenizer, ex, "plain")[0]
    head = tokenizer("the big wh")["input_ids"]
    whale = opts[0]
    assert whale.ids == tokenizer("the big whale")["input_ids"]
    assert whale.ids[: whale.continuation_start] == head[: whale.continuation_start]
    assert whale.continuation_start < len(head)  # the merged token is not dropped
    assert tokenizer.convert_ids_to_tokens(whale.ids[whale.continuation_start :]) == ["▁whale"]


def test_reductions():
    nll = torch.tensor([0.5, 0.0, 1.0, 2.0, 4.0])  # tokens 1..5; continuation = tokens 4..5
    opt = OptionTokens(ids=list(range(6)), continuation_start=4, choice_chars=3, choice_bytes=5)
    assert reduce_nll(nll, opt, "mean") == pytest.approx(7.5 / 4)  # the exact zero is left out of the count
    assert reduce_nll(nll, opt, "sum_continuation") == pytest.approx(6.0)
    assert reduce_nll(nll, opt, "mean_continuation") == pytest.approx(3.0)
    assert reduce_nll(nll, opt, "per_char_continuation") == pytest.approx(2.0)
    assert reduce_nll(nll, opt, "per_byte_continuation") == pytest.approx(1.2)


def test_accuracy_and_predictions():
    scores = [[1.0, 0.5], [2.0, 2.0, 3.0], [0.1, 0.2]]
    assert predictions(scores) == [1, 0, 0]  # ties go to the first option
    assert accuracy(scores, [1, 1, 0]) == pytest.approx(2 / 3)
    assert accuracy(scores, [{"label": 1}, {"label": 0}, {"label": 1}]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="label 2 is not an index"):
        accuracy(scores, [2, 0, 0])
    with pytest.raises(ValueError, match="3 score rows for 2 labels"):
        accuracy(scores, [0, 0])


class _NoWork(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("model work before validation")


@pytest.mark.parametrize(
    ("examples", "kwargs", "match"),
    [
        ([{"context": "a", "choices": [" b"]}], {"reduction": "max"}, "unknown reduction"),
        ([{"context": "a", "choices": [" b"]}], {"template": "{choice}{context}"}, "must come before"),
        ([{"context": "a", "choices": [" b"]}], {"template": "nope"}, "neither a known name"),
        ([{"context": "a", "choices": [" b"]}], {"batch_size": 0}, "batch_size"),
        ([{"context": 3, "choices": [" b"]}], {}, "example 0: 'context'"),
        ([{"context": "a", "choices": []}], {}, "'choices' must be a non-empty list"),
        ([{"context": "a", "choices": [" b"], "label": 1}], {}, r"'label' must be an integer in \[0, 1\)"),
        ([{"context": "a", "choices": [""]}], {"reduction": "per_char_continuation"}, "empty choice"),
        ({"context": "a"}, {}, "examples must be a list"),
    ],
)
def test_bad_input_raises_before_any_work(tokenizer, examples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_choices(_NoWork(), tokenizer, examples, **kwargs)


def test_a_model_in_training_mode_is_refused(phi3_setup, tokenizer):
    model = copy.deepcopy(phi3_setup.base).train()
    with pytest.raises(ValueError, match="training mode"):
        score_choices(model, tokenizer, make_choice_examples(1))


def test_patched_and_unpatched_scores_differ(phi3_setup, library, tokenizer):
    """The experts are in the loop: patching changes the scores (a check that the test model is not inert)."""
    ex = make_choice_examples(3, seed=6)
    base = copy.deepcopy(phi3_setup.base)
    plain = score_choices(base, tokenizer, ex)
    patched = score_choices(gkf.patch_model(base, library, top_k=2), tokenizer, ex)
    assert max(abs(a - b) for ra, rb in zip(plain, patched) for a, b in zip(ra, rb)) > 1e-4


def test_sdpa_attention_with_the_padded_prefix_cache(phi3_setup, library, tokenizer):
    """The masks over the padded prefix cache also hold with PyTorch's SDPA attention (the HF default)."""
    model = _patched(phi3_setup, library)
    model.set_attn_implementation("sdpa")
    examples = _examples()
    ours = score_choices(model, tokenizer, examples, reduction="sum_continuation", batch_size=6)
    naive = score_choices_naive(model, tokenizer, examples, reduction="sum_continuation")
    model64 = _patched(phi3_setup, library, torch.float64)
    ref64 = score_choices_naive(model64, tokenizer, examples, reduction="sum_continuation")
    flat = [torch.tensor([v for row in s for v in row], dtype=torch.float64) for s in (ours, naive, ref64)]
    assert_close_to_reference(flat[0], flat[2], flat[1], torch.float32, "sdpa")
