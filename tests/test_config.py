"""Config: YAML + dotted overrides, validated, with errors that name the key and the allowed values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ttpa_ray.config import ConfigError, TTPAConfig, load_config, parse_override

LOCAL = Path(__file__).parent.parent / "configs" / "local.yaml"


def test_local_default_loads() -> None:
    config = load_config(LOCAL)
    assert config.model.policy == "smollm2-135m-instruct"
    assert config.esm.weights.name == 3 and config.esm.weights.value == 2
    assert config.vllm.gpu_memory_utilization <= 0.3  # the CPU build fails at 0.92


def test_dotted_overrides_are_typed() -> None:
    config = load_config(
        LOCAL, ["tps.top_k=3", "tps.continuation=sampled", "ray.address=auto", "vllm.enforce_eager=false"]
    )
    assert config.tps.top_k == 3
    assert config.tps.continuation == "sampled"
    assert config.ray.address == "auto"
    assert config.vllm.enforce_eager is False


def test_bad_literal_names_key_and_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, ["tps.sampler=beam"])
    assert "tps.sampler" in str(err.value)
    assert "'tps', 'sequence'" in str(err.value)
    assert "beam" in str(err.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, ["tps.topk=3"])
    message = str(err.value)
    assert "tps.topk: unknown key" in message and "top_k" in message


def test_unknown_section_and_value_as_section() -> None:
    with pytest.raises(ConfigError, match=re.escape("nope: unknown key; allowed here: esm, eval, model")):
        load_config(None, ["nope.x=1"])
    with pytest.raises(ConfigError, match=re.escape("tps.top_k is a value, not a section")):
        load_config(None, ["tps.top_k=3", "tps.top_k.x=1"])


def test_range_and_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=re.escape("tps.top_k")):
        load_config(None, ["tps.top_k=0"])
    with pytest.raises(ConfigError, match=re.escape("replicas_max")):
        load_config(None, ["vllm.replicas_min=3", "vllm.replicas_max=2"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("does not exist")):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=re.escape("bad.yaml must hold a mapping")):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tps: {top_k: [\n")
    with pytest.raises(ConfigError, match=re.escape("broken.yaml is not valid YAML")):
        load_config(broken)


def test_parse_override_forms() -> None:
    assert parse_override("a.b=5") == (["a", "b"], 5)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError, match=re.escape("key.path=value")):
        parse_override("no-equals")
    with pytest.raises(ConfigError, match=re.escape("empty key segment")):
        parse_override("a..b=1")


def test_yaml_round_trip_and_digest() -> None:
    config = load_config(LOCAL)
    again = TTPAConfig.model_validate(__import__("yaml").safe_load(config.to_yaml()))
    assert again == config and again.digest() == config.digest()
    assert load_config(LOCAL, ["tps.top_k=2"]).digest() != config.digest()


@pytest.mark.parametrize("path", sorted((LOCAL.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.train.deepspeed in {"zero2", "zero3", None}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.pairs=/no/such/pairs.parquet",
            "train.pairs: Value error, /no/such/pairs.parquet does not exist",
        ),
        ("train.dialogues=./nope", "train.dialogues: Value error, nope does not exist"),
        (
            "eval.heldout_dialogues=/x/h.parquet",
            "eval.heldout_dialogues: Value error, /x/h.parquet does not exist",
        ),
        ("reverse.catalogue=builtin+./tols", "reverse.catalogue: Value error, './tols' is not builtin, bfcl"),
    ],
)
def test_input_paths_must_exist_when_the_config_is_read(override: str, message: str) -> None:
    """No silent fallback (issue 17): an input the config names that is not there is an error naming it."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(LOCAL, [override])


def test_named_catalogues_and_existing_inputs_pass(tmp_path: Path) -> None:
    (tmp_path / "pairs.parquet").write_bytes(b"")
    config = load_config(
        LOCAL,
        ["reverse.catalogue=builtin+bfcl:GorillaFileSystem", f"train.pairs={tmp_path / 'pairs.parquet'}"],
    )
    assert config.reverse.catalogue == "builtin+bfcl:GorillaFileSystem"
    assert config.train.pairs == tmp_path / "pairs.parquet"
