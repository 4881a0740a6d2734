"""Generated documentation stays in step with the code it is generated from."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    reference = _config_reference()
    assert reference.DOC.read_text(encoding="utf-8") == reference.render(), \
        "docs/CONFIG.md is stale; regenerate it: python scripts/config_reference.py"


def test_config_reference_lists_every_key_and_check_fails_on_a_stale_file(tmp_path):
    from a3gr.config import field_help

    reference = _config_reference()
    text = reference.render()
    assert all(f"| `{key}` |" in text for key, _, _ in field_help())
    path = tmp_path / "CONFIG.md"
    assert reference.main(["--check", "--path", str(path)]) == 1  # missing
    assert reference.main(["--path", str(path)]) == 0 and path.read_text(encoding="utf-8") == text
    assert reference.main(["--check", "--path", str(path)]) == 0
    path.write_text(text.replace("Global seed", "Seed"), encoding="utf-8")
    assert reference.main(["--check", "--path", str(path)]) == 1
