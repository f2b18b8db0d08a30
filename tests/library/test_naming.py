"""Expert names of adapters saved as Hugging Face Trainer saves them (``<run>/checkpoint-<N>``), and the refusal of a
run directory given instead of a checkpoint: through LoraLibrary.from_adapters (the command line is in
tests/cli/test_main.py)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from genknowsub_fast import LoraLibrary
from genknowsub_fast.library.naming import default_names, trainer_checkpoints

TASK_RUNS = ["cluster0_batch16", "cluster1_batch16", "cluster2_batch16"]
GENERAL_RUNS = ["wiki_langen", "wiki_langde", "wiki_langfr"]


def test_default_names_of_the_trainer_layout():
    tasks = ["out/cluster0_batch16/checkpoint-17", "out/cluster1_batch16/checkpoint-17"]
    assert default_names(tasks) == ["cluster0_batch16", "cluster1_batch16"]
    # two checkpoints of one run keep their step, with the run
    assert default_names(["r/checkpoint-10", "r/checkpoint-20", "s/checkpoint-3"]) == [
        "r/checkpoint-10",
        "r/checkpoint-20",
        "s",
    ]
    # the shortest suffix that tells them apart, only for those that would share a name
    assert default_names(["en/wiki/checkpoint-17", "de/wiki/checkpoint-17", "x/fr/checkpoint-17"]) == [
        "en/wiki",
        "de/wiki",
        "fr",
    ]
    assert default_names(["a/task_0", "b/task_0", "c/task_1"]) == ["a/task_0", "b/task_0", "task_1"]
    # a run directory that is an adapter itself, beside one of its checkpoints
    assert default_names(["r", "r/checkpoint-5"]) == ["r", "r/checkpoint-5"]
    # plain directories keep their names; a trailing separator changes nothing
    assert default_names(["x/task_0/", "x/task_1"]) == ["task_0", "task_1"]


def test_default_names_are_stable():
    """The same list in any order gives each path the same name; "." inside a run directory is named like it."""
    paths = ["en/wiki/checkpoint-17", "de/wiki/checkpoint-17", "fr/checkpoint-17", "r/checkpoint-1", "r/checkpoint-2"]
    names = dict(zip(paths, default_names(paths), strict=True))
    rev = paths[::-1]
    assert dict(zip(rev, default_names(rev), strict=True)) == names
    assert len(set(names.values())) == len(paths)


def test_dot_inside_a_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "cluster0_batch16" / "checkpoint-17"
    ckpt.mkdir(parents=True)
    monkeypatch.chdir(ckpt)
    assert default_names(["."]) == ["cluster0_batch16"]


def test_links_are_named_as_given(tmp_path, monkeypatch):
    """A name is the path given, never where a link points: a link to a checkpoint is named after itself."""
    ckpt = tmp_path / "runs" / "cluster0_batch16" / "checkpoint-17"
    ckpt.mkdir(parents=True)
    (tmp_path / "best_c0").symlink_to(ckpt)
    (tmp_path / "runs" / "cluster0_batch16" / "best").symlink_to(ckpt)
    monkeypatch.chdir(tmp_path)
    assert default_names(["best_c0", "runs/cluster0_batch16/best"]) == ["best_c0", "best"]


def test_library_from_trainer_checkpoints(trainer_runs):
    """The layout of the original code, as it is: distinct, meaningful names, and the same experts as from plain
    directories."""
    lib = LoraLibrary.from_adapters(trainer_runs.task, general_adapters=trainer_runs.general)
    assert lib.expert_names == TASK_RUNS
    assert lib.general_names == GENERAL_RUNS
    plain = LoraLibrary.from_adapters(trainer_runs.plain.task[:3], trainer_runs.plain.general)
    for path, m in plain.modules.items():
        assert torch.equal(lib.modules[path].a, m.a) and torch.equal(lib.modules[path].prototypes, m.prototypes)


def test_explicit_names_for_every_list(trainer_runs):
    t, g = trainer_runs.task, trainer_runs.general
    lib = LoraLibrary.from_adapters(
        t[:2], [g[0]], add_adapters=[g[1]], names=["c0", "c1"], general_names=["en"], add_names=["de"]
    )
    assert (lib.expert_names, lib.general_names, lib.added_names) == (["c0", "c1"], ["en"], ["de"])
    # default names of the added adapters follow the same rules
    lib = LoraLibrary.from_adapters(t[:2], [g[0]], add_adapters=[g[1]])
    assert (lib.expert_names, lib.general_names, lib.added_names) == (TASK_RUNS[:2], ["wiki_langen"], ["wiki_langde"])


def test_run_directory_is_refused_with_its_checkpoints(trainer_runs, monkeypatch):
    """A run directory instead of one of its checkpoints: refused before anything is read, listing the checkpoints
    (highest step first) and the path to pass."""
    import genknowsub_fast.library.build as build

    def no_reading(*args, **kwargs):
        raise AssertionError("adapters were read before the directories were checked")

    monkeypatch.setattr(build, "read_adapter", no_reading)
    run = os.path.dirname(trainer_runs.task[0])
    assert trainer_checkpoints(run) == ["checkpoint-17", "checkpoint-9"]
    expected = (
        rf"adapter '{run}' has no adapter_config.json: it is a training run directory holding Trainer checkpoints "
        rf"\(checkpoint-17, checkpoint-9, highest step first\); pass the checkpoint to use, e\.g\. "
        rf"'{os.path.join(run, 'checkpoint-17')}'"
    )
    with pytest.raises(ValueError, match=expected):
        LoraLibrary.from_adapters([run, trainer_runs.task[1]])
    general_run = os.path.dirname(trainer_runs.general[0])
    with pytest.raises(ValueError, match=r"wiki_langen' has no adapter_config\.json: it is a training run"):
        LoraLibrary.from_adapters(trainer_runs.task, [general_run])


def test_run_directory_with_an_adapter_of_its_own_is_an_adapter(trainer_runs, tmp_path):
    """What trainer.save_model() writes at the end of training: the adapter in the run directory itself."""
    import shutil

    from tests.conftest import trainer_checkpoint

    run = tmp_path / "cluster0_batch16"
    shutil.copytree(trainer_runs.plain.task[0], run)
    trainer_checkpoint(trainer_runs.plain.task[0], run, 17)
    lib = LoraLibrary.from_adapters([str(run), trainer_runs.task[1]])
    assert lib.expert_names == ["cluster0_batch16", "cluster1_batch16"]


def test_checkpoints_without_adapters_are_named(tmp_path):
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds Trainer checkpoints \(checkpoint-3\) but none of them has an"):
        LoraLibrary.from_adapters([str(tmp_path / "run")])


@pytest.mark.slow
def test_a_real_trainer_run(trainer_runs, tmp_path):
    """Adapters saved by transformers' Trainer itself (two steps, a checkpoint after each) on the same base model:
    the run directory is refused with both checkpoints, the latest one becomes an expert named after its run."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from genknowsub_fast.synthetic import PHI3_TARGETS

    torch.manual_seed(0)
    model = get_peft_model(
        trainer_runs.plain.fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=list(PHI3_TARGETS), lora_dropout=0.0)
    )
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "cluster9_batch16"
    args = TrainingArguments(
        output_dir=str(run), max_steps=2, save_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        learning_rate=1e-2, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids]).train()
    assert trainer_checkpoints(run) == ["checkpoint-2", "checkpoint-1"]
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= set(
        os.listdir(run / "checkpoint-2")
    )
    with pytest.raises(ValueError, match=r"\(checkpoint-2, checkpoint-1, highest step first\)"):
        LoraLibrary.from_adapters([str(run), trainer_runs.task[0]])
    lib = LoraLibrary.from_adapters([str(run / "checkpoint-2"), trainer_runs.task[0]], gks=None)
    assert lib.expert_names == ["cluster9_batch16", "cluster0_batch16"]
