"""eval_compare.py's table: medians, ranges and the speed-up come from the measured times."""

from benchmarks.eval_compare import table


def test_table_from_measurements():
    m = {
        "times": {"naive": [4.0, 5.0, 6.0], "ours": [1.0, 1.2, 0.9], "lm_eval": [3.0, 2.0, 2.5]},
        "accuracy": {"naive": (0.25, 0.5), "ours": (0.25, 0.5), "lm_eval": (None, 0.5)},
        "max_abs_diff": 3e-7,
        "examples": 8,
        "options": 32,
        "batch_size": 16,
        "threads": 2,
        "rounds": 3,
        "lm_eval_version": "0.4.13",
        "command": "python benchmarks/eval_compare.py",
    }
    text = table(m)
    assert "| naive per-option loop (the original code's) | 5.00 s (4.00–6.00) | 1.00× | 0.250 | 0.500 |" in text
    assert "| `score_choices` (batch 16, shared-prefix KV cache) | 1.00 s (0.90–1.20) | 5.00× | 0.250 | 0.500 |" in text
    assert "| lm-eval 0.4.13 `--model genknowsub` (batch 16) | 2.50 s (2.00–3.00) | 2.00× | — | 0.500 |" in text
    assert "Largest |score_choices − naive| NLL: 3.0e-07" in text
