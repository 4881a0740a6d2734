"""Typed config: defaults < preset < overrides; typos rejected with a suggestion."""
import pytest

from a3gr.config import ConfigError, config_hash, field_help, load_config


def test_defaults_preset_and_overrides_merge_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 11\netl:\n  k_core: 3\nlake:\n  root: /tmp/x\n")
    cfg = load_config(preset, ["etl.k_core=4", "source.synthetic.n_users=50"])
    assert (cfg.seed, cfg.etl.k_core, cfg.source.synthetic.n_users, cfg.lake.root) == (11, 4, 50, "/tmp/x")
    assert cfg.etl.max_history == 20  # untouched default


@pytest.mark.parametrize("override, message", [
    ("etl.k_cor=3", "unknown config key 'etl.k_cor'; did you mean 'etl.k_core'?"),
    ("sourse.kind=amazon", "did you mean 'source'?"),
    ("etl.k_core=five", "etl.k_core: expected int"),
    ("etl.k_core=2.5", "etl.k_core: expected an integer"),
    ("etl=3", "etl: expected a section"),
])
def test_bad_keys_and_values_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_preset_file_is_rejected(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("spark:\n  shuffle_partition: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'spark.shuffle_partitions'"):
        load_config(preset)


def test_hash_changes_with_content_and_every_field_has_help():
    assert config_hash(load_config()) == config_hash(load_config())
    assert config_hash(load_config()) != config_hash(load_config(None, ["seed=8"]))
    rows = field_help()
    assert {"etl.k_core", "lake.root", "source.synthetic.n_items"} <= {key for key, _, _ in rows}
    assert all(help_text for _, _, help_text in rows)
