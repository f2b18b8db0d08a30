"""eval_compare.py's table: medians, ranges and the speed-up come from the measured times; it names the machine."""

from benchmarks.eval_compare import table
from benchmarks.machine import describe


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
        "machine": "Some CPU (2 cores; AVX-512 visible: no, AVX-512-BF16 visible: no; torch sees AVX2; routed kernel "
        "ISA avx2)",
    }
    text = table(m)
    assert "| naive per-option loop (the original code's) | 5.00 s (4.00–6.00) | 1.00× | 0.250 | 0.500 |" in text
    assert "| `score_choices` (batch 16, shared-prefix KV cache) | 1.00 s (0.90–1.20) | 5.00× | 0.250 | 0.500 |" in text
    assert "| lm-eval 0.4.13 `--model genknowsub` (batch 16) | 2.50 s (2.00–3.00) | 2.00× | — | 0.500 |" in text
    assert "Largest |score_choices − naive| NLL: 3.0e-07" in text
    assert f"CPU: {m['machine']}, torch" in text


def test_describe_names_the_cpu_the_avx512_flags_and_the_kernel_isa():
    m = {"cpu": "AMD EPYC 9R14", "cores": 2, "avx512": True, "avx512_bf16": False, "torch_cpu_capability": "AVX512",
         "kernel_isa": "avx2", "kernel_isa_forced": "avx2"}  # fmt: skip
    assert describe(m) == (
        "AMD EPYC 9R14 (2 cores; AVX-512 visible: yes, AVX-512-BF16 visible: no; torch sees AVX512; routed kernel "
        "ISA avx2, forced by GENKNOWSUB_FAST_CPU_ISA=avx2)"
    )
    here = describe()
    assert "AVX-512 visible: " in here and "routed kernel ISA " in here
