"""The authors' released CHIMLE models: `chimle convert`, the authors' conventions, the code layout.

Synthetic checkpoints in the authors' format (random tensors) of every layout (plain state dict, the
`model_state_dict` training state, `module.` prefixes) and every forward variant; the key layout is
checked against the reference list of the authors' paper-size keys and shapes. The "same weights, same
outputs" check re-implements their forward in plain torch ops from the state-dict tensors (following
docs/design.md and chimle/inference/convert.py) and compares it with the converted chimle tower.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import chimle
from chimle import latent
from chimle.data.tasks import make_task
from chimle.inference.convert import (
    TASK_VARIANTS,
    authors_shapes,
    convert,
    from_authors,
    infer_config,
    key_map,
    read_checkpoint,
)
from chimle.inference.sample import generate
from chimle.inference.weights import CheckpointError, load_with_task
from chimle.model import TowerConfig, TowerModel

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["Super_Resolution", "Colourization", "generic"]
TASK_OF = {"Super_Resolution": "sr", "Colourization": "colorize", "generic": "jpeg"}

# tests/data/authors_tim_state_dict_shapes.json: every key and shape of the authors' paper-size tower, per
# variant, read off their released code; pinned too by key count and the SHA-256 of
# json.dumps({key: shape}, separators=(",", ":")) per variant, in the file's key order.
REFERENCE_SHA256 = {  # Super_Resolution and generic have the same keys and shapes (their forwards differ)
    "Super_Resolution": "6d9f4395640e84da8d45ac85bdddd131ca931c90611ff725bcdc5d824dfdc4ba",
    "Colourization": "158f00878a24eb9fcd3b2cfb70e370386196c68e90a1a59e3f3f393954ebc9a3",
    "generic": "6d9f4395640e84da8d45ac85bdddd131ca931c90611ff725bcdc5d824dfdc4ba",
}


def _reference_json() -> dict:
    return json.loads((Path(__file__).resolve().parent / "data" / "authors_tim_state_dict_shapes.json").read_text())


def _digest(shapes: dict) -> str:
    return hashlib.sha256(
        json.dumps({k: list(v) for k, v in shapes.items()}, separators=(",", ":")).encode()
    ).hexdigest()


def paper_cfg(task: str) -> TowerConfig:
    """The configuration the paper-size checkpoints must be inferred as (the authors' TIM, docs/design.md)."""
    return TowerConfig(
        levels=4,
        layout="upscale" if task == "sr" else "same",
        in_channels=1 if task == "colorize" else 3,
        out_channels=2 if task == "colorize" else 3,
        channels=(128, 64, 64, 64),
        growth=(256, 192, 128, 64),
        blocks=6,
        code_dim=128,
        noise_channels=5,
        mapping_width=512,
        mapping_layers=8,
        input_size=32 if task == "sr" else 256,
        feedback="tanh" if task == "sr" else "image",
        final_convs=task == "colorize",
        output_mode="ab_times_l" if task == "colorize" else "tanh01",
    )


def tiny_cfg(task: str, levels: int = 3) -> TowerConfig:
    """The paper's layout shrunk consistently: every size smaller, every key and rule the same."""
    return dataclasses.replace(
        paper_cfg(task),
        levels=levels,
        channels=(6, 5, 4, 4)[:levels],
        growth=(5, 4, 3, 3)[:levels],
        blocks=2,
        code_dim=4,
        noise_channels=2,
        mapping_width=8,
    )


def authors_checkpoint(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the authors' layout `shapes`, scaled so that activations stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("weight_g"):  # row norm of the effective conv weight
            t = 0.3 + 0.5 * torch.rand(s, generator=g)
        elif k.endswith("weight_v"):
            t = torch.randn(s, generator=g)
        elif k.endswith("weight"):  # linear layers; the AdaIN transforms a little smaller
            t = torch.randn(s, generator=g) / s[1] ** 0.5 * (0.3 if "transform" in k else 1.0)
        else:
            t = 0.1 * torch.randn(s, generator=g)
        sd[k] = t
    return sd


def authors_from_chimle(model: TowerModel, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The authors' state dict holding a chimle tower's weights (random tensors for keys chimle never uses)."""
    ours, shapes = model.state_dict(), authors_shapes(model.cfg, variant)
    filler = authors_checkpoint(shapes, seed)
    return {a: (ours[c].clone() if c is not None else filler[a]) for a, c in key_map(model.cfg, variant).items()}


# --------------------------------------------------------------------------------------------------
# Layout and inferred configuration


@pytest.mark.parametrize("variant", VARIANTS)
def test_authors_shapes_reproduce_the_reference_list(variant):
    """authors_shapes of the paper configuration is the reference JSON, key for key, in order."""
    ours = authors_shapes(paper_cfg(TASK_OF[variant]), variant)
    want = {k: tuple(v) for k, v in _reference_json()[variant].items()}
    assert list(ours) == list(want) and ours == want
    assert _digest(want) == REFERENCE_SHA256[variant]
    assert len(ours) == 1252
    assert _digest(ours) == REFERENCE_SHA256[variant]
    # Spot checks straight from the reference list.
    assert ours["level_2_feat.0.weight_v"][:2] == ((64, 134) if variant == "Colourization" else (64, 136))
    assert ours["level_4_map.0.weight"] == (512, 2048)
    assert ("level_4_up.0.weight_g" in ours) == (variant == "Colourization")


@pytest.mark.parametrize("task", ["sr", "colorize", "jpeg", "night"])
def test_paper_config_is_inferred(task):
    """The shapes of the paper-size checkpoint give the paper's configuration (tensors of stride 0: no memory)."""
    shapes = authors_shapes(paper_cfg(task), TASK_VARIANTS[task])
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    cfg = infer_config(sd, task)
    assert cfg == paper_cfg(task)
    assert (cfg.levels, cfg.channels, cfg.growth, cfg.blocks) == (4, (128, 64, 64, 64), (256, 192, 128, 64), 6)
    assert (cfg.code_dim, cfg.noise_channels, cfg.mapping_width, cfg.mapping_layers) == (128, 5, 512, 8)


def test_paper_size_sr_converts_once():
    """One paper-size conversion (210.6 M parameters, no forward): every used tensor lands in the model."""
    shapes = authors_shapes(paper_cfg("sr"), "Super_Resolution")
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    model = from_authors(sd, "sr")
    assert model.num_parameters() == sum(t.numel() for t in sd.values())
    assert abs(model.num_parameters() / 1e6 - 210.62) < 0.01
    assert model.cfg == paper_cfg("sr")


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_the_authors_layout(variant):
    """chimle tower -> the authors' state dict -> from_authors: the same tensors, bit for bit."""
    task = TASK_OF[variant]
    torch.manual_seed(0)
    model = TowerModel(tiny_cfg(task))
    back = from_authors(authors_from_chimle(model, variant), task)
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    dropped = [a for a, c in key_map(model.cfg, variant).items() if c is None]
    # Only the generic variant has keys it never uses: the last level's upsampler.
    assert dropped == (
        [f"level_3_up.{i}.{p}" for i in (1, 3) for p in ("bias", "weight_g", "weight_v")]
        if variant == "generic"
        else []
    )


# --------------------------------------------------------------------------------------------------
# Files: every layout, every variant, loaded like chimle's own weights


def _save_layout(sd: dict, layout: str, path: Path) -> Path:
    if layout == "module":  # nn.DataParallel
        sd = {f"module.{k}": v for k, v in sd.items()}
    if layout == "training":  # their latest.tar
        opt = {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
        }
        sd = {
            "data_idx": 7,
            "iteration": 1234,
            "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer_state_dict": opt,
        }
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("layout", ["plain", "module", "training"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_every_layout_and_variant(tmp_path, layout, variant):
    task = TASK_OF[variant]
    cfg = tiny_cfg(task)
    sd = authors_checkpoint(authors_shapes(cfg, variant))
    src = _save_layout(sd, layout, tmp_path / "ckpt.pth")
    out = convert(src, tmp_path / "w.safetensors", task)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "chimle-1" and meta["step"] == ("1234" if layout == "training" else "0")
    model, task_cfg = load_with_task(out)
    assert model.cfg == cfg and TowerConfig.from_dict(json.loads(meta["model"])) == cfg
    assert task_cfg == make_task(task, **({"scale": 8} if task == "sr" else {})).config()
    assert make_task(**task_cfg).layout == cfg.layout
    direct = from_authors(torch.load(src, weights_only=True), task)
    ours, theirs = model.state_dict(), direct.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert isinstance(chimle.load(out), TowerModel)


def test_cli_convert_and_sample(tmp_path, capsys):
    """`chimle convert` writes weights that `chimle sample` (here its function, tiled too) takes."""
    from chimle.apps.cli import main
    from chimle.data.imageio import save_image
    from chimle.inference.files import SampleOptions, Tiling, sample_paths

    cfg = tiny_cfg("sr")
    src = _save_layout(authors_checkpoint(authors_shapes(cfg, "Super_Resolution")), "training", tmp_path / "a.tar")
    assert main(["convert", str(src), str(tmp_path / "sr.safetensors"), "--task", "sr"]) == 0
    assert "3 levels" in capsys.readouterr().out
    save_image(torch.rand(3, 10, 12), tmp_path / "in.png")
    options = SampleOptions(tiling=Tiling(6))
    written = sample_paths(
        tmp_path / "sr.safetensors", tmp_path / "in.png", 1, tmp_path / "out", options, progress=False
    )
    assert any(p.name == "in_000.png" for p in written)


# --------------------------------------------------------------------------------------------------
# Malformed checkpoints: one line naming the first key that does not fit


def _tiny_sd(task: str = "sr") -> dict:
    return authors_checkpoint(authors_shapes(tiny_cfg(task), TASK_VARIANTS[task]))


def _error(sd, task: str = "sr") -> str:
    with pytest.raises(CheckpointError) as e:
        from_authors(sd, task)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_malformed_checkpoints_get_one_line(tmp_path):
    sd = _tiny_sd()
    missing = dict(sd)
    del missing["level_2_style.sub.1.RDB3.conv4.0.weight_g"]
    assert "missing key 'level_2_style.sub.1.RDB3.conv4.0.weight_g'" in _error(missing)

    wrong = dict(sd)
    wrong["level_2_style.sub.0.RDB2.conv3.0.weight_v"] = torch.zeros(4, 7, 3, 3)
    assert "key 'level_2_style.sub.0.RDB2.conv3.0.weight_v' has shape (4, 7, 3, 3), expected (4, 13, 3, 3)" in _error(
        wrong
    )

    extra = {**sd, "level_1_style.sub.9.RDB1.conv1.0.bias": torch.zeros(5)}
    assert "unexpected key 'level_1_style.sub.9.RDB1.conv1.0.bias'" in _error(extra)

    assert "missing key 'level_1_feat.0.weight_v' (first key: 'conv.weight')" in _error({"conv.weight": torch.zeros(1)})
    assert "key 'lr' holds a float, not a tensor" in _error({"lr": 1e-4})
    assert "use `chimle export`" in _error({"model": {}, "model_config": {}})
    # A colourisation checkpoint is not an SR one, and the other way round.
    assert "has 2 output channels; --task sr needs 3" in _error(_tiny_sd("colorize"), "sr")
    assert "has 3 output channels; --task colorize needs 2" in _error(sd, "colorize")
    no_upsampler = {
        k.replace("level_3_up.1.", "level_3_up.0.").replace("level_3_up.3.", "level_3_up.2."): v for k, v in sd.items()
    }
    assert "missing key 'level_3_up.1.weight_v' (--task sr); it has 'level_3_up.0.weight_v'" in _error(no_upsampler)
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        from_authors(sd, "deblur")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pth"
    torch.save(sd, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    pickled = tmp_path / "object.pth"
    torch.save({"weights": sd, "options": argparse.Namespace(lr=1e-4)}, pickled)
    for path, expect in (
        (text, "is not a PyTorch checkpoint"),
        (tmp_path / "nope.pth", "does not exist"),
        (truncated, "is not a readable PyTorch checkpoint"),
        (pickled, "holds an object of argparse.Namespace; the authors' checkpoints hold only tensors"),
    ):
        with pytest.raises(CheckpointError, match=expect) as e:
            convert(path, tmp_path / "x.safetensors", "sr")
        assert "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save(missing, bad)
    with pytest.raises(CheckpointError, match=r"^'.*bad\.pth': missing key 'level_2_style") as e:
        convert(bad, tmp_path / "x.safetensors", "sr")
    assert not (tmp_path / "x.safetensors").exists()


def test_read_checkpoint_strips_module_prefix_and_keeps_the_iteration(tmp_path):
    sd = _tiny_sd()
    got, step = read_checkpoint(_save_layout(sd, "training", tmp_path / "latest.tar"))
    assert step == 1234 and list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------------------
# Weight norm and the code layout


def test_weight_norm_mapping_keeps_the_effective_weights():
    """Every conv's effective weight is the authors' g * v / ||v||: exactly the legacy weight norm's."""
    cfg = tiny_cfg("colorize")
    sd = _tiny_sd("colorize")
    model = from_authors(sd, "colorize")
    convs = {a[: -len(".weight_g")]: c for a, c in key_map(cfg, "Colourization").items() if a.endswith("weight_g")}
    modules = dict(model.named_modules())
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in modules.values())
    for a, c in convs.items():
        conv = modules[c[: -len(".parametrizations.weight.original0")]]
        g, v = sd[f"{a}.weight_g"], sd[f"{a}.weight_v"]
        legacy = torch.nn.Conv2d(v.shape[1], v.shape[0], 3, padding=1)
        with pytest.warns(FutureWarning):  # the authors' torch.nn.utils.weight_norm, deprecated upstream
            legacy = torch.nn.utils.weight_norm(legacy)
        with torch.no_grad():
            legacy.weight_g.copy_(g)
            legacy.weight_v.copy_(v)
            legacy(torch.zeros(1, v.shape[1], 3, 3))  # its forward pre-hook recomputes .weight
        assert torch.equal(conv.weight, legacy.weight)
        torch.testing.assert_close(conv.weight, g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1), rtol=1e-6, atol=0)
        assert torch.equal(conv.bias, sd[f"{a}.bias"])


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_authors_code_layout_round_trips(layout):
    lay = TowerModel(TowerConfig.preset("tiny", layout=layout)).latent_layout((8, 8))
    codes = lay.sample(3, torch.Generator().manual_seed(0))
    flat = latent.to_authors(codes)
    assert [tuple(f.shape) for f in flat] == [(3, k) for k in lay.dims()]
    for f, c, (h, w) in zip(flat, codes, lay.sizes):  # what their forward reads
        assert torch.equal(f[:, : lay.code_dim], c.style)
        assert torch.equal(f[:, lay.code_dim :].reshape(3, lay.noise_channels, h, w), c.noise)
    back = latent.from_authors(flat, lay)
    assert all(torch.equal(a.style, b.style) and torch.equal(a.noise, b.noise) for a, b in zip(back, codes))
    assert len(latent.from_authors(flat[:2], lay)) == 2  # a partial code, as their partial evaluation
    with pytest.raises(ValueError, match="level 2"):
        latent.from_authors([flat[0], flat[1][:, :-1]], lay)


def test_convention_options_default_to_chimle_and_are_validated():
    cfg = TowerConfig.preset("tiny")
    assert not {"feedback", "final_convs", "output_mode"} & set(cfg.to_dict())  # old configs serialise as before
    assert TowerConfig.from_dict(paper_cfg("colorize").to_dict()) == paper_cfg("colorize")
    with pytest.raises(ValueError, match="feedback"):
        TowerConfig.preset("tiny", feedback="raw")
    with pytest.raises(ValueError, match="final_convs"):
        TowerConfig.preset("tiny", layout="upscale", final_convs=True)
    with pytest.raises(ValueError, match="ab_times_l"):
        TowerConfig.preset("tiny", output_mode="ab_times_l")


# --------------------------------------------------------------------------------------------------
# Same weights, same outputs: the authors' forward re-implemented from their code's conventions in plain torch ops


def _conv(sd, name, x):
    g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
    w = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return F.conv2d(x, w, sd[f"{name}.bias"], padding=1)


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


def authors_forward(
    sd: dict, variant: str, inputs: list, codes: list, map_nc: int, code_nc: int, num_blocks: int, map_layers: int = 8
) -> list:
    """Their TIM forward: `inputs` are the level inputs (SR: only the first is read), `codes` their flat
    per-level codes. Returns their outputs: (t + 1) / 2, or colourisation's cat(L, t)."""
    outputs, feature, raw, map_features = [], None, None, []
    levels = sum(1 for k in sd if k.endswith("_feat.0.weight_v"))

    def up(i, f):
        return _lrelu(
            _conv(sd, f"level_{i}_up.3", _lrelu(_conv(sd, f"level_{i}_up.1", F.interpolate(f, scale_factor=2))))
        )

    for i, code in enumerate(codes, 1):
        image = raw if (variant == "Super_Resolution" and i > 1) else inputs[i - 1]
        bs, _, h, w = image.shape
        x = torch.cat([image, code[:, map_nc:].reshape(bs, code_nc, h, w)] + ([0.1 * feature] if i > 1 else []), 1)
        m = torch.cat([_lrelu(_lin(sd, f"level_{i}_map_0.0", code[:, :map_nc]))] + map_features, 1)
        for j in range(map_layers - 1):
            m = _lrelu(_lin(sd, f"level_{i}_map.{2 * j}", m))
        map_features.append(m)
        f = _conv(sd, f"level_{i}_feat.0", x)
        y = f
        for k in range(num_blocks):
            r = y
            for d in (1, 2, 3):  # residual dense blocks
                feats = [r]
                for c in range(1, 6):
                    o = _conv(sd, f"level_{i}_style.sub.{k}.RDB{d}.conv{c}.0", torch.cat(feats, 1))
                    feats.append(_lrelu(o))
                r = feats[0] + 0.2 * o
            r = y + 0.2 * r  # around the RRDB
            t = _lin(sd, f"level_{i}_style.sub.transform_{k}", m)
            nc = r.shape[1]
            y = (1 + t[:, :nc, None, None]) * F.instance_norm(r, eps=1e-5) + t[:, nc:, None, None]
        f = f + _conv(sd, f"level_{i}_style.sub.lr_conv.0", y)
        if variant == "Super_Resolution":
            feature = up(i, f)
            raw = torch.tanh(_conv(sd, f"level_{i}_out.0", feature))
            outputs.append((raw + 1) / 2)
            continue
        if variant == "Colourization" and i == levels:
            f = _lrelu(_conv(sd, f"level_{i}_up.2", _lrelu(_conv(sd, f"level_{i}_up.0", f))))
        t = torch.tanh(_conv(sd, f"level_{i}_out.0", f))
        outputs.append(torch.cat([image, t], 1) if variant == "Colourization" else (t + 1) / 2)
        if i < levels:
            feature = up(i, f)
    return outputs


def _their_lab_to_rgb(out: torch.Tensor) -> np.ndarray:
    """Their colour path (mode "A*L*B*L"): a = t / max(L, 0.01) * 127, L floored too; Lab -> sRGB by skimage."""
    from skimage.color import lab2rgb

    l_floor = out[:, :1].clamp(min=0.01)
    lab = torch.cat([l_floor * 100, out[:, 1:] / l_floor * 127], 1)
    with warnings.catch_warnings():  # random weights give out-of-gamut colours: clipped, as in chimle
        warnings.simplefilter("ignore", UserWarning)
        return np.stack([lab2rgb(im.permute(1, 2, 0).numpy()) for im in lab]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_tower_computes_the_authors_function(variant):
    task = TASK_OF[variant]
    cfg = tiny_cfg(task)
    sd = {k: v.double() for k, v in _tiny_sd(task).items()}  # float64: agreement to rounding, not luck
    model = from_authors(sd, task).double()
    hw = (3, 5) if task == "sr" else (8, 12)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, cfg.in_channels, *hw, generator=g, dtype=torch.float64)
    if task == "colorize":
        x = 0.05 + 0.95 * x
        x[0, 0, :2, :2] = 0.0  # black corners: L below the 0.01 floor
    layout = model.latent_layout(hw)
    flat = [torch.randn(2, k, generator=g, dtype=torch.float64) for k in layout.dims()]  # as their gen_code
    with torch.no_grad():
        ours = model(x, latent.from_authors(flat, layout))
        inputs = model.initial_state(x).inputs  # the same level inputs for both
        theirs = authors_forward(sd, variant, inputs, flat, cfg.code_dim, cfg.noise_channels, cfg.blocks)
    assert len(ours) == len(theirs) == cfg.levels
    for level, (a, b) in enumerate(zip(ours, theirs), 1):
        assert b[:, -cfg.out_channels :].std() > 1e-2  # outputs that vary: the comparison means something
        if task != "colorize":
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
            continue
        # Ours is chroma (ab + 128) / 255; theirs cat(L, t) with t = (ab / 127) * max(L, 0.01).
        L, t = b[:, :1], b[:, 1:]
        assert torch.equal(L, inputs[level - 1])
        torch.testing.assert_close(a * 255 - 128, t / L.clamp(min=0.01) * 127, rtol=0, atol=1e-9)
        rgb = make_task("colorize").rgb(a, x).numpy()
        ref = _their_lab_to_rgb(b)
        lit = np.broadcast_to((L >= 0.01).numpy(), rgb.shape)  # their RGB also floors L* at 1
        assert lit.mean() > 0.9
        np.testing.assert_allclose(rgb[lit], ref[lit], rtol=0, atol=1e-6)


def test_tiled_sampling_of_a_converted_tower_matches_untiled():
    """The conventions hold in tiled inference (the feedback and the colour head read per-tile inputs)."""
    for task in ("sr", "colorize"):
        model = from_authors(_tiny_sd(task), task)
        hw = (12, 12) if task == "sr" else (32, 32)
        x = torch.rand(1, model.cfg.in_channels, *hw)
        whole = generate(model, x, 1, torch.Generator().manual_seed(0))
        tiled = generate(model, x, 1, torch.Generator().manual_seed(0), tile=hw[0] // 2 + 4, overlap=4)
        assert whole.shape == tiled.shape
        assert (whole - tiled).abs().mean() < 0.05
