"""The secret scanner that `make test` (and so CI) runs: clean on the repository, red on a planted secret."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNER = ROOT / "scripts" / "scan_secrets.py"


def _copy_of_repo(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _scan(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCANNER), str(root)], capture_output=True, text=True, timeout=600)


def test_the_repository_is_clean_and_a_planted_secret_fails_the_scan(tmp_path):
    copy = _copy_of_repo(tmp_path / "repo")
    clean = _scan(copy)
    assert clean.returncode == 0, clean.stdout
    planted = copy / "configs" / "leaked.yaml"
    # assembled at run time so this test file itself holds no secret-shaped literal
    planted.write_text("storage:\n  aws_access_key_id: " + "AKIA" + "Q3EGRIYVXAMPLE7Z" + "\n"
                       "  aws_secret_access_key: " + "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzEXAMPLEKEY" + "\n")
    found = _scan(copy)
    assert found.returncode == 1
    assert "configs/leaked.yaml:2" in found.stdout and "AWS Access Key" in found.stdout
