"""The main job on a small setting, its run dir in a bucket: killed after its reverse stage, then
submitted with the Ray job CLI to another Ray cluster, where it resumes from the bucket; each stage's
counts add up and the report exists and parses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, make_bucket, ray_head, vllm_processes

from ttpa_ray import store
from ttpa_ray.evaluate import HELDOUT_CATEGORY
from ttpa_ray.pipeline import STAGES

ROOT = Path(__file__).parent.parent
LOCAL = ROOT / "configs" / "local.yaml"
BIN = ROOT / ".venv" / "bin"


def submit_job(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``ray job submit --working-dir <repo> -- python -m jobs.pipeline <args>`` to a head of its own
    (``ray start --head``, dashboard and job agent on free ports), stopped afterwards."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head_args = [
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    excludes = {"excludes": [".venv", "runs", "models", ".git", ".pytest_cache"]}
    submit = [
        *(str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}"),
        *("--working-dir", str(ROOT), "--runtime-env-json", json.dumps(excludes)),
        *("--", "python", "-m", "jobs.pipeline", "--config", "configs/local.yaml", "ray.address=auto"),
        *args,
    ]
    with ray_head(head_args, env, tmp_path / "head.log"):
        deadline = time.time() + 120
        not_up_yet = ("No available agent", "Connection refused")
        while True:  # the dashboard and its job agent come up some seconds after the head
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1500)
            output = result.stdout + result.stderr
            if not any(text in output for text in not_up_yet) or time.time() > deadline:
                break
            time.sleep(3)
        head_output = (tmp_path / "head.log").read_text()[-2000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + head_output
    assert "succeeded" in result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_pipeline_in_a_bucket_killed_and_resumed_elsewhere(
    ray_cluster, s3_server: str, tiny_model_dir: Path, tmp_path: Path, heldout_dialogues_file: Path
) -> None:
    """The job on a run dir in an S3 bucket (a real S3 server on 127.0.0.1), killed (SIGKILL) after
    its reverse stage, then submitted with `ray job submit` to another cluster with another, empty
    working copy: the stages the bucket says are finished are skipped, the others run, every count
    adds up, and everything a later run needs is in the bucket (issues 8, 17 and 19)."""
    import ray

    remote = make_bucket("pipeline") + "/runs/small"
    # The random tiny teacher's dialogues never pass the filters, so the run's own held-out split is
    # empty: the evaluation is pointed at two dialogues of really executed built-in calls instead.
    overrides = [
        f"run.run_dir={remote}",
        f"model.policy={tiny_model_dir}",
        "eval.categories=[simple_python, parallel]",
        "eval.limit_per_category=3",
        "eval.max_tokens=96",
        "vllm.gpu_memory_utilization=0.1",  # a smaller KV cache: each of its engines starts ~4 s sooner
        "reverse.num_seeds=4",
        "reverse.shard_size=4",
        "tps.bfcl_limit=6",
        "train.dpo.max_steps=4",
        "train.save_steps=2",
        f"eval.heldout_dialogues={heldout_dialogues_file}",
    ]
    before = vllm_processes()
    address = ray.get_runtime_context().gcs_address
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.pipeline",
            "--config",
            str(LOCAL),
            *overrides,
            f"run.local_dir={tmp_path / 'first'}",
            f"ray.address={address}",
        ],
        cwd=LOCAL.parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    summary_uri = remote + "/pipeline.json"
    deadline = time.time() + 600

    def finished() -> list[str]:  # as the bucket has it
        if not store.exists(summary_uri):
            return []
        try:
            return [s["name"] for s in json.loads(store.read_text(summary_uri))["stages_run"]]
        except json.JSONDecodeError:  # read while the driver replaced it: look again next time
            return []

    while "reverse" not in finished() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert job.poll() is None, "the job ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_after = finished()
    assert killed_after[:2] == ["prepare-models", "reverse"] and "evaluate" not in killed_after
    assert store.exists(remote + "/reverse/shards/shard-00000.done.json")  # written by the replica
    while vllm_processes() - before and time.time() < deadline:
        time.sleep(0.5)  # the killed job's replicas go with it

    # another cluster, another machine's working copy: nothing local but the bucket
    overrides.append(f"run.local_dir={tmp_path / 'second'}")
    shown = submit_job(overrides, tmp_path).stdout  # the job's console, as `ray job submit` streams it
    for number, name in enumerate(killed_after, start=1):
        assert f"[{number}/{len(STAGES)}] {name}: done by an earlier run, skipped" in shown
    stages = [name for name, _, _ in STAGES]

    run_dir = tmp_path / "second"  # the working copy; the bucket holds the same
    assert store.read_text(remote + "/pipeline.json") == (run_dir / "pipeline.json").read_text()
    assert store.read_text(remote + "/eval/report.json") == (run_dir / "eval" / "report.json").read_text()
    fs, root = store.resolve(remote + "/train/dpo/ray")
    saved = [i.path for i in fs.get_file_info(store.pafs.FileSelector(root, recursive=True))]
    assert any("checkpoint_" in p for p in saved), saved  # Ray Train wrote its checkpoints there
    assert not (run_dir / "train" / "dpo" / "ray").exists()
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["name"] for s in summary["stages_run"]] == stages
    for stage in summary["stages_run"]:
        assert stage["records_in"] == stage["records_out"] + stage["records_rejected"], stage
    assert summary["stages_pending"] == []
    by_name = {s["name"]: s for s in summary["stages_run"]}
    assert by_name["reverse"]["records_in"] == 4
    split = by_name["reverse"]["notes"]
    assert split["train_dialogues"] + split["heldout_dialogues"] == by_name["reverse"]["records_out"]
    assert (run_dir / "dialogues" / "train.parquet").exists()
    assert (run_dir / "dialogues" / "heldout.parquet").exists()
    assert by_name["tps"]["records_in"] == 6 + by_name["reverse"]["records_out"]
    assert by_name["pairs"]["records_in"] == by_name["tps"]["records_in"]
    assert by_name["dpo"]["records_out"] > 0  # pairs were trained on
    # configs/local.yaml holds back 20% of the pairs' dialogues (here BFCL entries) and evaluates on them
    assert 0 < by_name["dpo"]["notes"]["heldback_pairs"] < by_name["dpo"]["records_out"]
    assert 0.0 <= by_name["dpo"]["notes"]["heldback_reward_accuracy"] <= 1.0
    sequence = by_name["sequence"]["notes"]  # the baseline: as many pairs as TTPA, the same steps
    assert 0 < sequence["pairs_for_dpo"] <= sequence["ttpa_pairs"] == by_name["pairs"]["notes"]["pairs"]
    assert (run_dir / "train" / "dpo-sequence" / "policy" / "config.json").exists()
    steps = {
        name: json.loads((run_dir / "train" / name / "metrics.json").read_text())["final"]["step"]
        for name in ("dpo", "dpo-sequence")
    }
    assert steps == {"dpo": 4, "dpo-sequence": 4}
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    models = ("base", "ttpa", "sequence")  # the table's rows (no SFT: the tiny teacher made no dialogue)
    assert set(report) == {*models, "comparisons", "data_quality"}
    # the run's data quality, as reverse construction reported it: 4 seeds, none admitted
    quality = report["data_quality"]
    assert quality == by_name["reverse"]["notes"]["quality"]
    assert (quality["seeds"], quality["dialogues"]) == (4, by_name["reverse"]["records_out"])
    assert sum(quality["reasons"].values()) == by_name["reverse"]["records_rejected"]
    assert "## Data quality (reversed construction)" in (run_dir / "eval" / "report.md").read_text()
    assert {(c["row"], c["baseline"]) for c in report["comparisons"]} == {("ttpa", "sequence")}
    for model in models:  # 6 BFCL entries + 4 held-out turns
        assert report[model]["all"]["n"] + report[model]["all"]["infra_errors"] == 10
        assert set(report[model]) == {"simple_python", "parallel", HELDOUT_CATEGORY, "all"}
        assert report[model][HELDOUT_CATEGORY]["n"] == 4
        assert 0.0 <= report[model]["all"]["mean_esm"] <= 1.0
        assert sum(report[model]["all"]["esm_histogram"]) == 10
    answers = [json.loads(line) for line in (run_dir / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 30
    heldout_ids = {a["id"] for a in answers if a["category"] == HELDOUT_CATEGORY}
    assert heldout_ids == {"dlg-0/0", "dlg-0/1", "dlg-1/0", "dlg-1/1"}
    for name in ("esm_histogram.png", "error_categories.png", "exact_match.png"):
        assert (run_dir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / "eval" / "report.md").read_text()
    assert "| base | all | 10 | 0 |" in markdown and "| ttpa | all | 10 | 0 |" in markdown
    assert (run_dir / "train" / "dpo" / "policy" / "config.json").exists()
    assert f"[{len(stages)}/{len(stages)}] evaluate: ESM" in shown and "report:" in shown


def test_evaluation_rejects_entries_with_unusable_ground_truth() -> None:
    """BFCL's live_simple_106-63-0 lists no acceptable value for a required argument."""
    from ttpa_ray.bfcl import load_entries
    from ttpa_ray.esm import ESMWeights
    from ttpa_ray.evaluate import bfcl_items, score_answers

    wanted = {"live_simple_0-0-0", "live_simple_106-63-0"}
    entries = [e for e in load_entries("live_simple") if e.id in wanted]
    results, rejected = score_answers(bfcl_items(entries), {}, ESMWeights())
    assert [r.id for r in results] == ["live_simple_0-0-0"]
    assert (
        results[0].infra_error and results[0].esm_errors == []
    )  # no answer: the machinery's, not a model error
    assert [(r.input_id, r.reason) for r in rejected] == [("live_simple_106-63-0", "invalid_ground_truth")]
