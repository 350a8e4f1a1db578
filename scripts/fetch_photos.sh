#!/usr/bin/env bash
# The photo corpus (`data.data: photos`): the real photographs that Debian packages ship, chosen by eye
# file by file (scripts/photo_corpus.py: SOURCES; docs/data.md lists the packages, counts and licences),
# de-duplicated, downscaled to 640 px on the long side, as PNGs. scikit-image's photos are held out.
#
# Needs apt-get and dpkg (no root needed for `apt-get download`; 775 MB of packages, fetched into a
# temporary folder, unpacked one by one and removed: under 1 GB there at a time) and this repo's Python
# (Pillow, numpy; scikit-image for the held-out check). About 3 minutes on 2 cores.
# Usage: scripts/fetch_photos.sh   (writes $CHIMLE_CACHE/photo_corpus, default ~/.cache/chimle/photo_corpus)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${CHIMLE_CACHE:-$HOME/.cache/chimle}/photo_corpus"
PY="${PYTHON:-python}"
if "$PY" "$HERE/photo_corpus.py" complete "$DEST"; then
    echo "photo corpus already complete in $DEST: $(compgen -G "$DEST/*.png" | wc -l) photos"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mapfile -t PKGS < <("$PY" "$HERE/photo_corpus.py" packages)
(cd "$TMP" && apt-get download "${PKGS[@]}" >&2)
for pkg in "${PKGS[@]}"; do
    debs=("$TMP"/"${pkg}"_*.deb)
    mkdir -p "$TMP/x/$pkg"
    dpkg -x "${debs[0]}" "$TMP/x/$pkg"
    rm -f "${debs[0]}"
done
"$PY" "$HERE/photo_corpus.py" build "$TMP/x" "$DEST"
