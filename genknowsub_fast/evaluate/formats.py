"""Option templates, reduction names and example checks of the evaluation (plain Python: the CLI imports them
to build its arguments without importing torch)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

TEMPLATES = {
    "plain": "{context}{choice}",
    # The original's option format (data_handler/test_datasets.py of Modular-LLM): no space after <|assistant|>.
    "phi3-chat": "<|user|>\n{context}<|end|>\n<|assistant|>{choice}<|end|>\n",
}
REDUCTIONS = ("mean", "sum_continuation", "mean_continuation", "per_char_continuation", "per_byte_continuation")


def resolve_template(template: str) -> str:
    """A named template (:data:`TEMPLATES`) or a string with one ``{context}`` before one ``{choice}``."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    text = TEMPLATES.get(template, template)
    if text.count("{context}") != 1 or text.count("{choice}") != 1:
        raise ValueError(
            f"template {template!r} is neither a known name ({', '.join(TEMPLATES)}) nor a string with exactly one "
            "{context} and one {choice}"
        )
    if text.index("{context}") > text.index("{choice}"):
        raise ValueError(f"template {template!r}: {{context}} must come before {{choice}}")
    return text


def check_examples(examples: Sequence[Mapping], need_labels: bool = False) -> None:
    """Raise ValueError naming the first malformed example (context str, choices non-empty list of str, label)."""
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
        raise ValueError(f"examples must be a list of dicts, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise ValueError(f"example {i}: expected a dict, got {type(ex).__name__}")
        if not isinstance(ex.get("context"), str):
            raise ValueError(f"example {i}: 'context' must be a string")
        choices = ex.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"example {i}: 'choices' must be a non-empty list of strings")
        label = ex.get("label")
        if label is None and not need_labels:
            continue
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"example {i}: 'label' must be an integer in [0, {len(choices)}), got {label!r}")


def lm_eval_task_yaml(name: str, data: str) -> str:
    """An lm-eval task config that scores the JSONL file ``data`` (fields as :func:`check_examples` wants) the way
    :func:`genknowsub_fast.evaluate.score_choices` does with the ``"plain"`` template: each request is the context
    followed directly by the option (empty target delimiter), reported as ``acc`` (summed log-likelihood) and
    ``acc_norm`` (per byte). Write it into a folder given to ``lm_eval.tasks.TaskManager(include_path=...)``.
    """
    if not name.isidentifier():
        raise ValueError(f"task name must be an identifier, got {name!r}")
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",  # quoted: a path may hold ':' or '#'
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
    ]
    return "\n".join(lines) + "\n"
