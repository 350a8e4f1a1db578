#!/usr/bin/env bash
# The training photos of the shipped models (`data.data: wallpapers`): the photographs that Debian's
# mate-backgrounds and lomiri-wallpapers-16.04 packages ship, downscaled to 640 px on the long side
# (wallpapers are 1280-5640 px wide; at 640 px a 64 px crop holds an object's worth of detail, as in
# the 400-600 px scikit-image photos the models are evaluated on). PNG wallpapers are drawn graphics
# (stripes, logos, flat colour) and are left out, as are two larger copies of Elephants.jpg and
# GreenTraditional.jpg (a near-white pattern). 28 photos.
#
# Needs apt-get (no root needed for `apt-get download`) and this repo's Python (Pillow).
# Usage: scripts/fetch_training_photos.sh   (writes $CHIMLE_CACHE/wallpapers, default ~/.cache/chimle/wallpapers)
set -euo pipefail

DEST="${CHIMLE_CACHE:-$HOME/.cache/chimle}/wallpapers"
PY="${PYTHON:-python}"
if [[ -d "$DEST" ]] && compgen -G "$DEST/*.png" > /dev/null; then
    echo "training photos already present in $DEST"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download mate-backgrounds lomiri-wallpapers-16.04 >&2)
for deb in "$TMP"/*.deb; do dpkg -x "$deb" "$TMP/x"; done
mkdir -p "$DEST"
"$PY" - "$TMP/x" "$DEST" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the largest wallpaper is 5640 x 3172
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
skip = {"Elephants_3840x2160.jpg", "Elephants_5640x3172.jpg", "GreenTraditional.jpg"}
n = 0
for f in sorted(src.rglob("*.jpg")):
    if f.name in skip:
        continue
    im = Image.open(f).convert("RGB")
    s = 640 / max(im.size)
    im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
    tmp = dest / f".{f.stem}.png.tmp"
    im.save(tmp, format="PNG")
    tmp.replace(dest / f"{f.stem}.png")
    n += 1
print(f"wrote {n} photos into {dest}")
PYEOF
