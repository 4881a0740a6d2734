"""Fail when a file of the repository holds something that looks like a secret (detect-secrets).

    python scripts/scan_secrets.py [ROOT]

Scans the files git tracks under ROOT (every file when ROOT is not a git checkout, skipping
virtual environments, lakes and caches), prints each finding as file:line: type, and exits 1 if
there is any. A line that is a deliberate non-secret example carries `# pragma: allowlist secret`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SKIP_DIRS = {".git", ".venv", ".venv-vllm", "lake", "lake_instruments", "__pycache__", ".pytest_cache",
             ".ruff_cache", "build", ".whl", ".gpu_data"}


def candidate_files(root: Path) -> list[str]:
    if (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [name for name in listed.decode().split("\0") if name and (root / name).is_file()]
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts)]


def scan(root: Path) -> dict[str, list[dict]]:
    files = candidate_files(root)
    if not files:
        return {}
    out = subprocess.run([sys.executable, "-m", "detect_secrets", "scan", *files], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["results"]


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    findings = scan(root)
    for name, hits in sorted(findings.items()):
        for hit in hits:
            print(f"{name}:{hit['line_number']}: {hit['type']}")
    print(f"secret scan of {root}: {sum(map(len, findings.values()))} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
