"""Test-session setup and fixtures shared by every test directory."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, so it must be set before anything imports triton: without
# a GPU the Triton kernels run in the interpreter (numpy), which is what the kernel tests under tests/ use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass
class TinySetup:
    """A tiny random model with synthetic task and general adapters written in PEFT format."""

    base: torch.nn.Module
    task: list
    general: list
    ids: torch.Tensor

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)


def _tiny(tmp_path_factory, make, targets, name, num_tasks=5, num_general=3):
    from genknowsub_fast.synthetic import write_adapters

    base = make()
    out = tmp_path_factory.mktemp(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, out, num_tasks, num_general, rank=4, target_modules=targets, seed=1)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return TinySetup(base, ad.task, ad.general, ids)


@pytest.fixture(scope="session")
def phi3_setup(tmp_path_factory) -> TinySetup:
    from genknowsub_fast.synthetic import PHI3_TARGETS, make_phi3

    return _tiny(tmp_path_factory, lambda: make_phi3("tiny"), PHI3_TARGETS, "phi3")


@pytest.fixture(scope="session")
def phi2_setup(tmp_path_factory) -> TinySetup:
    from genknowsub_fast.synthetic import PHI2_TARGETS, make_phi2

    return _tiny(tmp_path_factory, make_phi2, PHI2_TARGETS, "phi2")


# What Hugging Face Trainer writes into <output_dir>/checkpoint-<global_step> besides the model (transformers'
# Trainer._save_checkpoint; checked against a real run of transformers 5.x on a PEFT model): the PEFT model's
# save_pretrained files (adapter_config.json, adapter_model.safetensors, README.md) sit directly in it.
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


def trainer_checkpoint(adapter_dir, run_dir, step: int) -> str:
    """Copy a PEFT adapter directory to ``run_dir/checkpoint-<step>`` with the other files Trainer writes there."""
    import json
    import shutil

    dst = os.path.join(run_dir, f"checkpoint-{step}")
    shutil.copytree(adapter_dir, dst)
    for name in TRAINER_FILES:
        if name == "trainer_state.json":
            state = {"global_step": step, "best_model_checkpoint": None, "log_history": []}
            with open(os.path.join(dst, name), "w") as f:
                json.dump(state, f)
        else:
            torch.save({"step": step}, os.path.join(dst, name))
    return dst


@dataclass
class TrainerRuns:
    """The original GenKnowSub code's adapters as Trainer saved them: ``<run>/checkpoint-<N>``."""

    root: str
    task: list  # cluster{i}_batch16/checkpoint-17
    general: list  # wiki_lang{en,de,fr}/checkpoint-17
    plain: TinySetup  # the same adapters in plain directories (task_i, general_i)


@pytest.fixture(scope="session")
def trainer_runs(tmp_path_factory, phi3_setup) -> TrainerRuns:
    """phi3_setup's first three task and three general adapters in Trainer's layout; every task run also keeps an
    earlier checkpoint-9, as Trainer does with several saves."""
    root = tmp_path_factory.mktemp("trainer_runs")
    task = []
    for i, src in enumerate(phi3_setup.task[:3]):
        run = os.path.join(root, f"cluster{i}_batch16")
        trainer_checkpoint(src, run, 9)
        task.append(trainer_checkpoint(src, run, 17))
    general = [
        trainer_checkpoint(src, os.path.join(root, f"wiki_lang{lang}"), 17)
        for lang, src in zip(("en", "de", "fr"), phi3_setup.general, strict=True)
    ]
    return TrainerRuns(str(root), task, general, phi3_setup)
