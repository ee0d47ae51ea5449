"""Shared-prefix DPO is exact: loss, every gradient and TRL's metrics equal TRL's standard forward's.

In-process, float32, on the tiny model (no Ray): the same collated batch goes through TracedDPOTrainer's
loss with ``shared_prefix`` off (TRL's concatenated [chosen; rejected] forward) and on (one packed row per
pair), with a policy perturbed away from its reference so that the reference log-probs matter, for both
reference modes (precomputed columns; a live reference model, packed too). Batches hold six pairs of
different lengths (padding), some cut by ``max_length``; the pairs branch after a shared completion
prefix (TPS's token-level pairs), share only the prompt (the sequence baseline's), or both in one batch.
Under Ray Train and DeepSpeed the option is on by default, so the ZeRO-3 tests (test_train_dpo.py with
the replicas' reference, test_train_resume.py with a live one) and the ZeRO-2 job test run it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from ttpa_ray.train import shared_prefix
from ttpa_ray.train.shared_prefix import IGNORE, pack_pairs

RELATIVE_TOLERANCE = 1e-4
MAX_LENGTH = 150  # a few rows below are longer: truncated by TRL's collator in both forwards


def _pairs(kind: str, count: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Token-level pairs: ``branching`` completions share a prefix, then differ; ``disjoint`` ones differ
    from their first token (only the prompt is shared). The first pair runs past MAX_LENGTH in its
    suffixes, the second (branching) in its shared completion prefix, where truncation leaves both rows
    equal."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    out = []
    for i in range(count):
        prompt = tokens({0: MAX_LENGTH - 8, 1: MAX_LENGTH - 2}.get(i, rng.randrange(20, 100)))
        common = tokens(rng.randrange(4, 16)) if kind == "branching" else []
        chosen, rejected = tokens(rng.randrange(1, 14) + 9), tokens(rng.randrange(1, 14) + 9 * (i % 2))
        while rejected[0] == chosen[0]:
            rejected[0] = rng.randrange(3, vocab)
        out.append({"prompt_ids": prompt, "chosen_ids": common + chosen, "rejected_ids": common + rejected})
    return out


def _trainer(model_dir: Path, tmp: Path, reference: str) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.train.dpo import TracedDPOConfig, TracedDPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rows: dict[str, list[Any]] = {"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]}
    if reference == "precomputed":
        rows |= {"ref_chosen_logps": [-1.0], "ref_rejected_logps": [-2.0]}
    args = TracedDPOConfig(
        output_dir=str(tmp),
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=reference == "precomputed",
    )
    trainer = TracedDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
    )
    # away from the reference, so that policy and reference log-probs differ and both matter
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trainer.model.train()
    return trainer


def _loss_and_grads(trainer: Any, batch: dict[str, torch.Tensor], shared: bool) -> tuple[Any, ...]:
    trainer.args.shared_prefix = shared
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _spy_on_packing(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    packings: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        packings.append(pack_pairs(*args, **kwargs))
        return packings[-1]

    monkeypatch.setattr(shared_prefix, "pack_pairs", spy)
    return packings


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_shared_prefix_loss_and_gradients_equal_trl_standard_forward(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: str
) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = _trainer(tiny_model_dir, tmp_path, reference)
    vocab = trainer.model.config.vocab_size
    pad = trainer.processing_class.pad_token_id
    collate = DataCollatorForPreference(pad_token_id=pad, max_length=MAX_LENGTH)
    packings = _spy_on_packing(monkeypatch)
    # the last case recomputes activations in the backward, as the 7B config trains
    cases = [("branching", "sigmoid"), ("disjoint", "sigmoid"), ("mixed", "sigmoid"), ("mixed", "ipo")]
    cases.append(("mixed", "sigmoid+checkpointing"))
    for kind, loss_type in cases:
        if kind == "mixed":
            examples = _pairs("branching", 3, vocab, seed=3) + _pairs("disjoint", 3, vocab, seed=4)[::-1]
        else:
            examples = _pairs(kind, 6, vocab, seed=len(kind))
        batch = collate(examples)
        assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding
        assert any(len(e["prompt_ids"]) + len(e["chosen_ids"]) > MAX_LENGTH for e in examples)  # cut
        if reference == "precomputed":
            batch["ref_chosen_logps"] = torch.linspace(-90.0, -40.0, len(examples))
            batch["ref_rejected_logps"] = torch.linspace(-80.0, -45.0, len(examples))
        trainer.loss_types = [loss_type.split("+")[0]]
        if loss_type.endswith("+checkpointing"):
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})

        packings.clear()
        standard_loss, standard_grads, standard_metrics = _loss_and_grads(trainer, batch, shared=False)
        assert not packings
        loss, grads, metrics = _loss_and_grads(trainer, batch, shared=True)
        # packed once for the policy and the live reference, and fewer tokens than the standard rows
        assert len(packings) == 1 and packings[0] is not None
        assert packings[0].packed_tokens < packings[0].standard_tokens

        loss_gap = _relative(loss, standard_loss)
        grad_gaps = {name: _relative(grads[name], g) for name, g in standard_grads.items()}
        worst = max(grad_gaps, key=grad_gaps.__getitem__)
        print(
            f"{kind}/{reference}/{loss_type}: loss {float(standard_loss):.6f} vs {float(loss):.6f} "
            f"(relative {loss_gap:.2e}); gradients: max relative difference {grad_gaps[worst]:.2e} "
            f"({worst}); {packings[0].packed_tokens} tokens packed for {packings[0].standard_tokens}"
        )
        assert grads.keys() == standard_grads.keys()
        assert len(grads) == len(list(trainer.model.parameters()))
        assert loss_gap < RELATIVE_TOLERANCE
        assert grad_gaps[worst] < RELATIVE_TOLERANCE
        assert metrics.keys() == standard_metrics.keys() | {"shared_prefix/token_share"}
        assert metrics["shared_prefix/token_share"] == packings[0].packed_tokens / packings[0].standard_tokens
        for key, value in standard_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (kind, loss_type, key)


def test_pack_pairs_layout() -> None:
    """Prompt [1 2 3], chosen [4 5 6], rejected [4 7]: shared = 4 tokens, the rejected segment repeats the
    last shared token (4) at its position (3) and sees only the three tokens before it."""
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = input_ids.masked_fill(torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]) == 0, IGNORE)
    packed = pack_pairs(input_ids, attention_mask, labels)
    assert packed is not None
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 4, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    # scored: 3 -> 4 (shared, both rows), 4 -> 5, 5 -> 6 (chosen), 4 -> 7 (the repeated token, rejected)
    assert packed.shift_labels.tolist() == [[IGNORE, IGNORE, 4, 5, 6, IGNORE, 7, IGNORE]]
    mask = packed.attention_mask[0, 0].int().tolist()
    assert mask[6] == [1, 1, 1, 0, 0, 0, 1, 0]
    assert mask[7] == [1, 1, 1, 0, 0, 0, 1, 1]
    assert mask[5] == [1, 1, 1, 1, 1, 1, 0, 0]
    values = torch.arange(8.0).view(1, 8)  # value of packed position p: p
    assert packed.unpack(values).tolist() == [[0, 0, 2, 3, 4], [0, 0, 2, 6, 0]]
    assert packed.packed_tokens == 8 and packed.standard_tokens == 11


def test_left_padded_batch_is_not_packed() -> None:
    input_ids = torch.tensor([[1, 2, 3], [0, 1, 2]])
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert pack_pairs(input_ids, attention_mask, input_ids) is None


@pytest.mark.slow
def test_shared_prefix_on_ray_zero3_gives_trl_standard_log_probs(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Ray Train, 2 workers, ZeRO-3 (parameters sharded and gathered layer by layer): step 1 trains the
    initial policy, whose reference log-probs TRL's standard forward computed on the driver; the packed
    forward on the shards gives the same numbers, so both rewards (0.1 x the log-prob gap) are ~0."""
    import math

    from ttpa_ray.config import TrainConfig
    from ttpa_ray.records import write_parquet
    from ttpa_ray.train.data import bfcl_preference_pairs
    from ttpa_ray.train.run import run_stage

    pairs_file = write_parquet(bfcl_preference_pairs("simple_python")[:40], tmp_path / "pairs.parquet")
    train = TrainConfig(
        num_workers=2,
        deepspeed="zero3",
        save_steps=1000,
        dpo={
            "reference": "precomputed",
            "shared_prefix": True,
            "max_steps": 1,
            "per_device_batch_size": 8,
            "max_length": 384,
            "init_from_sft": False,
        },
    )
    outcome = run_stage(
        "dpo", train, policy=str(tiny_model_dir), run_dir=tmp_path, run_name="zero3", input_path=pairs_file
    )
    step = outcome.result.history[0]
    print(f"ZeRO-3 shared-prefix step 1: {step}")
    assert outcome.result.policy_dir is not None
    assert step["logps/chosen"] < -10 and step["logps/rejected"] < -10
    assert abs(step["rewards/chosen"]) < 1e-4 and abs(step["rewards/rejected"]) < 1e-4
    assert 0.3 < step["shared_prefix/token_share"] < 0.8  # the workers did pack (about half the tokens)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-4)
