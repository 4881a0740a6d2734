"""Security hygiene of our own code: safe model loading only, no remote code by default."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("a3gr", "etl", "expectations", "tokenize_jobs", "training", "batch_infer", "bench", "scripts")


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    for path, text in _sources():
        for line in text.splitlines():
            if "torch.load(" in line:  # our calls fit on one line
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        assert "pickle.load" not in text, path


def test_remote_code_is_never_switched_on_in_code():
    for path, text in _sources():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path


def test_the_backbone_passes_the_configured_remote_code_switch_and_it_defaults_to_off():
    from a3gr.config import BackboneConfig

    assert BackboneConfig().trust_remote_code is False
    text = (ROOT / "training" / "backbone.py").read_text()
    assert "bcfg.trust_remote_code" in text and '"trust_remote_code": trust_remote_code' in text
