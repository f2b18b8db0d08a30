"""eval_formats: lm_eval_task_yaml gives a config lm-eval's YAML loader reads back into the fields our JSONL needs."""

import pytest
import yaml

from genknowsub_fast.evaluate.formats import lm_eval_task_yaml


def test_the_config_reads_back_with_a_path_yaml_would_misparse():
    path = "/data/x: y #1/task.jsonl"
    cfg = yaml.safe_load(lm_eval_task_yaml("my_task", path))
    assert cfg["task"] == "my_task" and cfg["dataset_kwargs"]["data_files"]["test"] == path
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("context", "choices", "label")
    assert cfg["target_delimiter"] == "" and cfg["output_type"] == "multiple_choice"
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]


def test_a_task_name_that_is_not_an_identifier_is_refused():
    with pytest.raises(ValueError, match="identifier"):
        lm_eval_task_yaml("my task: x", "a.jsonl")
