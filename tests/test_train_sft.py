"""SFT on reversed dialogues: loss on assistant turns only, and the `jobs.train` entry point on Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from ttpa_ray.config import StageConfig
from ttpa_ray.records import Dialogue, Message, RejectedRow, read_parquet
from ttpa_ray.rundir import write_split
from ttpa_ray.train.data import bfcl_preference_pairs, chat_token_counter, check_dialogues


def _dialogues(n: int) -> list[Dialogue]:
    """Dialogues shaped like the reversed construction's: question, call, tool response, answer."""
    out = []
    for pair in bfcl_preference_pairs("simple_python")[:n]:
        call = pair.chosen[0]
        messages = (
            *pair.prompt,
            call,
            Message("tool", json.dumps({"result": 42}), name=call.tool_calls[0].name),
            Message("assistant", "The result is 42."),
        )
        out.append(Dialogue(f"d-{pair.pair_id}", "seed", messages, pair.tools))
    return out


def test_sft_loss_covers_assistant_turns_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.train.arguments import RunSettings
    from ttpa_ray.train.sft import build_sft_trainer, sft_args

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dialogues = [d.to_row() for d in _dialogues(4)]
    table = check_dialogues(dialogues, chat_token_counter(tokenizer), 1024).table
    args = sft_args(StageConfig(), tmp_path, RunSettings(seed=0, deepspeed=None, use_cpu=True, save_steps=10))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = build_sft_trainer(model, tokenizer, table, args)
    row = trainer.train_dataset[0]
    mask = [label != -100 for label in row["labels"]]  # TRL builds the labels when preparing the data
    trained = tokenizer.decode([t for t, m in zip(row["input_ids"], mask, strict=True) if m])
    ignored = tokenizer.decode([t for t, m in zip(row["input_ids"], mask, strict=True) if not m])
    assert "<tool_call>" in trained and "The result is 42." in trained
    question = _dialogues(1)[0].messages[0].content
    assert question is not None and question in ignored and question not in trained
    assert "<tool_response>" in ignored and "# Tools" in ignored


@pytest.mark.slow
def test_jobs_train_sft_on_ray_with_zero2(ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from ttpa_ray.cli import main  # what `python -m jobs.train` runs

    run_dir = tmp_path / "run"
    good = _dialogues(12)
    bad = Dialogue("d-empty", "seed", (Message("user", "hello?"),), good[0].tools)  # no assistant turn
    # SFT reads the train part of the run's split (ttpa_ray/rundir.py), never the reverse shards
    write_split(run_dir, [*good, bad], 0.0, 0)
    config = yaml.safe_load(Path("configs/local.yaml").read_text(encoding="utf-8"))
    config["run"]["run_dir"] = str(run_dir)
    config["model"]["policy"] = str(tiny_model_dir)
    config["train"] = {"num_workers": 2, "deepspeed": "zero2", "save_steps": 2}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")

    with pytest.raises(SystemExit) as ended:
        main(
            [
                "train",
                "sft",
                "--config",
                str(config_file),
                "train.sft.max_steps=3",
                "train.sft.learning_rate=1e-3",
            ]
        )

    assert ended.value.code == 0
    out = run_dir / "train" / "sft"
    rejected = read_parquet(RejectedRow, out / "rejected.parquet")
    assert [(r.input_id, r.reason) for r in rejected] == [("d-empty", "no_assistant_turn")]
    assert pq.read_table(out / "train_table.parquet").num_rows == len(good)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["final"]["step"] == 3
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3]
    assert all(h["loss"] > 0 for h in metrics["history"])
    from ttpa_ray.train.export import check_policy_folder

    assert check_policy_folder(out / "policy")["architecture"] == "Qwen2ForCausalLM"
    # a bad override is one clear message, not a traceback
    with pytest.raises(SystemExit) as ended:
        main(["train", "sft", "--config", str(config_file), "train.deepspeed=zero9"])
    assert ended.value.code == 2
