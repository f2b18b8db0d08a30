"""A small word-level tokenizer and random multiple-choice examples over a fixed word list (no hub needed)."""

from __future__ import annotations

WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "whale",
    "sat",
    "ran",
    "swam",
    "flew",
    "on",
    "in",
    "under",
    "over",
    "park",
    "mat",
    "river",
    "tree",
    "house",
    "stone",
    "which",
    "animal",
    "is",
    "largest",
    "smallest",
    "blue",
    "red",
    "green",
    "big",
    "small",
    "true",
    "false",
    "yes",
    "no",
    "question",
    "answer",
    "because",
    "it",
    "they",
    "water",
    "land",
)
CHAT_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>")


def make_tokenizer(vocab_size: int = 128, add_bos: bool = True, seed: int = 0):
    """A sentencepiece-style BPE tokenizer (``▁`` word marks, like Phi-3's) trained on :data:`WORDS`.

    Built with the ``tokenizers`` package, no download. Specials: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3
    (the ids :func:`make_phi3` configures) and Phi-3's chat tokens. With ``add_bos`` every encoding starts with
    ``<s>``. Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` writes a loadable directory).
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *CHAT_TOKENS]
    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(WORDS, k=12)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(WORDS)) | set("▁.,?!'-:;()0123456789\n"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(CHAT_TOKENS),
    )


def make_choice_examples(
    n: int, num_choices: int = 4, seed: int = 0, context_words: tuple[int, int] = (8, 24)
) -> list[dict]:
    """``n`` random multiple-choice examples ``{"context", "choices", "label"}`` over :data:`WORDS`.

    Choices start with a space (the word boundary belongs to the continuation, as in lm-eval) and hold 1-4 words.
    """
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        context = "question: " + " ".join(rng.choices(WORDS, k=rng.randint(*context_words))) + " answer:"
        choices = [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(num_choices)]
        out.append({"context": context, "choices": choices, "label": rng.randrange(num_choices)})
    return out


__all__ = ["WORDS", "CHAT_TOKENS", "make_tokenizer", "make_choice_examples"]
