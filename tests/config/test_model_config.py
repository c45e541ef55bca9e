"""Config validation names the field; YAML/JSON/CLI overrides coerce types."""

import json

import pytest

from modern_llm.config import ModernLLMConfig, apply_overrides, load_config, save_config


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"d_model": 100, "n_heads": 3}, "d_model"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"moe_layers": [0], "moe_n_experts": 2, "moe_top_k": 3}, "moe_top_k"),
        ({"moe_layers": [7]}, "moe_layers"),
        ({"pos_encoding": "alibi"}, "pos_encoding"),
        ({"dropout": 1.5}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"d_model": 24, "n_heads": 8}, "head_dim"),  # head_dim 3 is odd: RoPE impossible
    ],
)
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModernLLMConfig(**kw)


def test_defaults_fill_derived_fields():
    c = ModernLLMConfig(d_model=96, n_heads=4)
    assert c.n_kv_heads == 4 and c.d_ff == 256 and c.moe_d_ff == 256


def test_cli_overrides_coerce_types_and_reject_typos():
    c = apply_overrides(
        ModernLLMConfig(), ["--n_layers", "3", "--qk_norm", "true", "--rope_theta=500", "--moe_layers", "0,2"]
    )
    assert (c.n_layers, c.qk_norm, c.rope_theta, c.moe_layers) == (3, True, 500.0, [0, 2])
    with pytest.raises(ValueError, match="n_layer"):
        apply_overrides(c, ["--n_layer", "3"])
    with pytest.raises(ValueError, match="n_layers"):
        apply_overrides(c, ["--n_layers", "three"])


def test_yaml_and_json_roundtrip(tmp_path):
    c = ModernLLMConfig(d_model=64, n_heads=2, n_sinks=4)
    save_config(c, tmp_path / "m.yaml")
    assert load_config(ModernLLMConfig, tmp_path / "m.yaml") == c
    (tmp_path / "m.json").write_text(json.dumps({"d_model": 64, "n_heads": 2}))
    assert load_config(ModernLLMConfig, tmp_path / "m.json", ["--n_layers", "1"]).n_layers == 1


def test_bad_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(ModernLLMConfig, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml"):
        load_config(ModernLLMConfig, tmp_path / "list.yaml")


def test_overrides_rederive_fields_that_were_derived():
    c = apply_overrides(ModernLLMConfig(d_model=64, n_heads=4), ["--n_heads", "2", "--d_model", "96"])
    assert c.n_kv_heads == 2 and c.d_ff == 256
    explicit = ModernLLMConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=100)
    c = apply_overrides(explicit, ["--d_model", "128"])
    assert c.n_kv_heads == 2 and c.d_ff == 100  # user-set values stay


def test_nested_validation_errors_name_the_section():
    from dataclasses import dataclass, field

    from modern_llm.config.base import config_from_dict

    @dataclass
    class Run:
        model: ModernLLMConfig = field(default_factory=ModernLLMConfig)

    with pytest.raises(ValueError, match=r"^model: d_model \(100\)"):
        config_from_dict(Run, {"model": {"d_model": 100, "n_heads": 3}})


def test_mapping_fields_parse_from_the_cli():
    from dataclasses import dataclass, field
    from typing import Any

    @dataclass
    class Data:
        task_args: dict[str, Any] = field(default_factory=dict)

    assert apply_overrides(Data(), ["--task_args", "{n_train: 10, seed: 1}"]).task_args == {
        "n_train": 10,
        "seed": 1,
    }
    with pytest.raises(ValueError, match="task_args"):
        apply_overrides(Data(), ["--task_args", "[1, 2]"])
