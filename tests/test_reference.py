"""Reference log-probs from the vLLM replicas equal TRL's own reference pass on the same pairs
(issue 19): same tokenisation, same prompt split, same truncation, same sums."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ttpa_ray.config import load_config
from ttpa_ray.reference import replica_reference_logps, trl_token_ids
from ttpa_ray.train.data import REF_COLUMNS, bfcl_preference_pairs


@pytest.mark.slow
@pytest.mark.parametrize("cut", [False, True])
def test_replica_reference_logps_match_trls(ray_cluster: Any, tiny_model_dir: Path, cut: bool) -> None:
    """cut: max_length just past the longest prompt, so completions are cut, by both alike."""
    from transformers import AutoTokenizer

    from ttpa_ray.train.dpo import precompute_reference_logps
    from ttpa_ray.train.run import check_inputs

    pairs = bfcl_preference_pairs("simple_python")[:8]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    checked = check_inputs("dpo", [p.to_row() for p in pairs], tokenizer, 1024)
    assert checked.num_rows == 8
    max_length = 1024
    if cut:
        ids = [trl_token_ids(tokenizer, row, 1024) for row in checked.table.to_pylist()]
        max_length = max(start for _, _, start in ids) + 2
        assert any(len(chosen) > max_length for chosen, _, _ in ids)
    vllm = load_config(None, ["vllm.batch_size=3"]).vllm  # 8 pairs in 3 batches
    ours = replica_reference_logps(
        vllm, str(tiny_model_dir), checked.table, max_length=max_length, dtype="float32"
    )
    # TRL's own pass (its standard forward), and ours, which computes each pair's shared part once
    trl, shared = (
        precompute_reference_logps(
            tiny_model_dir, checked.table, max_length=max_length, dtype="float32", shared_prefix=packed
        )
        for packed in (False, True)
    )
    assert ours.column("sample_index").to_pylist() == checked.table.column("sample_index").to_pylist()
    for column in REF_COLUMNS:
        mine, theirs = ours.column(column).to_pylist(), trl.column(column).to_pylist()
        assert all(v < 0 for v in mine)
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-2), column
        assert shared.column(column).to_pylist() == pytest.approx(theirs, rel=1e-5), column
    assert ours.column(REF_COLUMNS[0]).to_pylist() != ours.column(REF_COLUMNS[1]).to_pylist()
