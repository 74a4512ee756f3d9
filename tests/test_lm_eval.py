"""lm-evaluation-harness contract: a local multiple-choice task runs end to end, no download."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="parallax lm-eval needs the 'hf' extra")
pytest.importorskip("lm_eval", reason="parallax lm-eval needs the 'eval' extra")

from parallax.checkpoint import save_checkpoint  # noqa: E402
from parallax.cli.main import main  # noqa: E402
from parallax.config import RunConfig  # noqa: E402
from parallax.data import build_data  # noqa: E402
from parallax.models import build_model  # noqa: E402
from parallax.train.trainer import bind_data_shapes  # noqa: E402

TASK = """\
task: parallax_sort_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def test_local_task_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = RunConfig.from_dict({}, ["model.name=transformer", "model.d_model=32", "model.n_heads=2",
                                   "model.n_layers=1", "data.name=sort", "data.length=5", "data.vocab=8"])
    bind_data_shapes(cfg, build_data(cfg.data))
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    save_checkpoint(run, 1, build_model(cfg.model), "transformer", {"step": 1})

    # sort questions in the task's own symbols; choices of different lengths pad the batches
    docs = [
        {"query": "<s> 3 1 4 |", "choices": ["1 3 4", "4 3", "3 1 4"], "gold": 0},
        {"query": "<s> 7 2 5 |", "choices": ["7 5 2", "2 5 7", "2"], "gold": 1},
        {"query": "<s> 0 6 6 |", "choices": ["0 6 6", "6 6"], "gold": 0},
        {"query": "<s> 5 5 1 |", "choices": ["5", "5 1 5", "1 5 5"], "gold": 2},
    ]
    data = tmp_path / "sort.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "parallax_sort_choice.yaml").write_text(TASK.format(data=data))

    out = tmp_path / "results.json"
    assert main(["lm-eval", str(run), "--tasks", "parallax_sort_choice", "--include-path", str(tasks),
                 "--limit", "4", "--batch-size", "3", "--device", "cpu", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["results"]["parallax_sort_choice"]
    assert 0.0 <= metrics["acc,none"] <= 1.0


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    cfg = RunConfig.from_dict({}, ["model.name=transformer", "model.d_model=32", "model.n_heads=2",
                                   "model.n_layers=1", "data.name=sort"])
    bind_data_shapes(cfg, build_data(cfg.data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    save_checkpoint(run, 1, build_model(cfg.model), "transformer", {"step": 1})
    assert main(["lm-eval", str(run), "--tasks", "no_such_task_here", "--device", "cpu"]) == 1
    assert "unknown lm-eval task 'no_such_task_here'" in capsys.readouterr().err
