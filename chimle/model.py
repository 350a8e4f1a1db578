"""The Tower Implicit Model (TIM): TIM paper Sect. 4.1/4.3, CHIMLE paper Sect. 2.3 and appendix A.

A chain of L levels ("modules"), each at twice the resolution of the previous. Level l has
  * a local stream: input conv -> RRDB blocks (weight-normalised convs) -> conv, with a skip;
  * a global stream: a mapping network turning the level's global code (and the w of all earlier
    levels) into w_l, which drives an AdaIN after every RRDB: x = (1 + gamma) * IN(x) + beta;
    with `style_grid` G > 1 the global code is a G x G grid of vectors, mapped cell by cell, and
    gamma, beta are bilinearly upsampled from G x G to the feature's size (a style per region);
  * an output head (conv -> tanh -> (x + 1) / 2), so every level emits an image in [0, 1] that is
    supervised against the target downsampled to that level (intermediate supervision);
  * a latent component z_l = (global code, spatial noise channels), see `chimle.latent`.

Two layouts:
  "same"    (night-to-day, decompression, colourisation): the input is downsampled to every level;
            level l works at full / 2^(L-l) and its output has the size of its input.
  "upscale" (super-resolution by 2^L): level 1 reads the input, each later level reads the previous
            level's output (as the authors' code does); level l outputs input * 2^l.

The authors' conventions, where their code computes otherwise (`chimle.inference.convert` sets them for
towers converted from their checkpoints; the defaults are chimle's): `feedback="tanh"` (their SR feeds
later levels the raw tanh in [-1, 1]), `final_convs` (their colourisation's last level: two more convs
before the head), `output_mode="ab_times_l"` (their colourisation's head predicts (a/127)*L, (b/127)*L).

    cfg = TowerConfig.preset("tiny", layout="upscale")
    model = TowerModel(cfg)
    codes = model.sample_codes(2, generator=torch.Generator().manual_seed(0))
    outs = model(x, codes)                   # list of L images in [0, 1], coarsest first
    y2 = model.partial(x, codes, level=2)    # runs levels 1..2 only; == outs[1]

`chimle presets` prints the parameter counts of the presets. `NoiseEncoder` is cIMLE's (scene layouts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .latent import Codes, Component, LatentLayout
from .resample import resize

__all__ = ["TowerConfig", "TowerModel", "LevelState", "NormStats", "NoiseEncoder", "PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # The authors' configuration (their released code; docs/design.md): 210.62 M parameters in the "upscale" layout; the
    # "same" layout has no upsampler after the last level (it would be unused): 210.55 M.
    "paper": dict(
        levels=4,
        channels=(128, 64, 64, 64),
        growth=(256, 192, 128, 64),
        blocks=6,
        code_dim=128,
        noise_channels=5,
        mapping_width=512,
        mapping_layers=8,
    ),
    # Same shape, narrower and shallower: trains on a CPU in minutes at 64-128 px.
    "small": dict(
        levels=3,
        channels=(64, 32, 32),
        growth=(32, 32, 16),
        blocks=2,
        code_dim=32,
        noise_channels=3,
        mapping_width=128,
        mapping_layers=4,
    ),
    # For unit tests and the CPU demo.
    "tiny": dict(
        levels=3,
        channels=(16, 12, 8),
        growth=(8, 8, 8),
        blocks=1,
        code_dim=8,
        noise_channels=2,
        mapping_width=32,
        mapping_layers=2,
    ),
}


@dataclass
class TowerConfig:
    """Architecture of a Tower Implicit Model. Per-level tuples are ordered coarsest first."""

    levels: int = 4  # L, number of levels (modules); each doubles the resolution
    layout: str = "same"  # "same" (output size == input size) or "upscale" (x 2^L)
    in_channels: int = 3  # channels of the conditioning input (1 for colourisation's L)
    out_channels: int = 3  # channels of every level's output (2 for colourisation's ab)
    channels: tuple[int, ...] = (128, 64, 64, 64)  # nf: feature channels of each level's local stream
    growth: tuple[int, ...] = (256, 192, 128, 64)  # gc: growth channels of the dense blocks
    blocks: int = 6  # RRDBs per level, each followed by an AdaIN
    code_dim: int = 128  # size of each level's global code (input of the mapping net)
    noise_channels: int = 5  # spatial noise channels of each level's latent component
    mapping_width: int = 512  # width of the mapping network's layers (size of w)
    mapping_layers: int = 8  # linear layers per mapping network
    feature_scale: float = 0.1  # scale of the previous level's feature fed to the next level
    residual_scale: float = 0.2  # beta, residual scaling in dense blocks and around each RRDB
    input_size: int = 256  # default input side for `sample_codes` (32 for 16x SR)
    # The authors' conventions (niopeng/CHIMLE), for towers converted from their checkpoints
    # (`chimle.inference.convert`); the defaults are chimle's own and leave a tower unchanged.
    feedback: str = "image"  # "upscale": what levels > 1 read of the previous output: "image"
    #                                          its [0, 1] output; "tanh" the raw tanh in [-1, 1] (authors' SR)
    final_convs: bool = False  # "same": conv, LReLU, conv, LReLU between the last level's trunk and
    #                                          its head (the authors' colourisation: an `up` block without upsampling)
    output_mode: str = "tanh01"  # head tanh t -> output: "tanh01" (t + 1) / 2; "ab_times_l" the authors'
    #                                          colourisation, t = (a / 127) * max(L, 0.01), returned as ab01 (see Level)
    # chimle's own option, not the authors': a path for the low frequencies. Every level's head corrects
    # its input image (upsampled in "upscale") instead of painting the output from features alone, so an
    # untrained level already returns the input's colours; see `Level.output` and README "Shipped models".
    input_skip: bool = False
    # cIMLE's noise encoder (scene layouts, Sect. 4.2.2): each level's noise channels are made by a small
    # conv net from the level's input image (the layout) and a lower-dimensional noise of `encoder_noise`
    # channels, which is what the latent code holds and the search draws.
    noise_encoder: bool = False
    encoder_noise: int = 10
    # chimle's own option: each level's style is a G x G grid of vectors (i.i.d. N(0, I)), each mapped on
    # its own; the AdaINs' gamma and beta are bilinearly upsampled from the grid to the feature's size, so
    # the modulation varies smoothly over the image. G = 1 is the papers' single style vector. Why: a
    # single style makes colourisation's modes whole-image tints (docs/research.md); a grid allows regional ones.
    style_grid: int = 1

    # Fields written by `to_dict` only when they differ from their defaults, so that every existing config
    # serialises exactly as before (config.yaml of a run, whose resume compares it, and exported metadata).
    _CONVENTIONS: ClassVar[tuple[str, ...]] = (
        "feedback",
        "final_convs",
        "output_mode",
        "input_skip",
        "noise_encoder",
        "encoder_noise",
        "style_grid",
    )

    def __post_init__(self) -> None:
        self.channels, self.growth = tuple(self.channels), tuple(self.growth)
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.layout not in ("same", "upscale"):
            raise ValueError(f"layout must be 'same' or 'upscale', got {self.layout!r}")
        for name in ("channels", "growth"):
            if len(getattr(self, name)) != self.levels:
                raise ValueError(f"{name} needs one entry per level ({self.levels}), got {getattr(self, name)}")
        if self.mapping_layers < 2:
            raise ValueError("mapping_layers must be >= 2 (a first layer plus the layer that mixes earlier w)")
        if self.feedback not in ("image", "tanh"):
            raise ValueError(f"feedback must be 'image' or 'tanh', got {self.feedback!r}")
        if self.output_mode not in ("tanh01", "ab_times_l"):
            raise ValueError(f"output_mode must be 'tanh01' or 'ab_times_l', got {self.output_mode!r}")
        if self.input_skip and (self.in_channels != self.out_channels or self.feedback != "image"):
            raise ValueError("input_skip needs in_channels == out_channels and feedback 'image' (it adds to the image)")
        if not isinstance(self.style_grid, int) or isinstance(self.style_grid, bool) or self.style_grid < 1:
            raise ValueError(
                f"style_grid must be an integer >= 1 (the side of the style grid), got {self.style_grid!r}"
            )
        if self.encoder_noise < 1:
            raise ValueError(f"encoder_noise must be >= 1, got {self.encoder_noise}")
        if self.final_convs and self.layout != "same":
            raise ValueError("final_convs needs the 'same' layout (in 'upscale' the last level has its upsampler)")
        if self.output_mode == "ab_times_l" and (self.layout, self.in_channels, self.out_channels) != ("same", 1, 2):
            raise ValueError(
                "output_mode 'ab_times_l' is colourisation's: layout 'same', in_channels 1 (L), out_channels 2 (ab)"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TowerConfig:
        """A named configuration ("paper", "small", "tiny"); any field can be overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        levels = overrides.get("levels", base["levels"])
        if levels != base["levels"]:  # stretch per-level tuples to a different depth
            for k in ("channels", "growth"):
                if k not in overrides:
                    base[k] = tuple(base[k][min(i, len(base[k]) - 1)] for i in range(levels))
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in d.items() if not (k in self._CONVENTIONS and v == defaults[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TowerConfig keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def scale(self) -> int:
        """Output side / input side."""
        return 2**self.levels if self.layout == "upscale" else 1

    def level_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Input resolution of each level (where its noise lives) for an input of h x w."""
        if self.layout == "upscale":
            return [(h << l, w << l) for l in range(self.levels)]
        f = 2 ** (self.levels - 1)
        if h % f or w % f:
            raise ValueError(f"input {h}x{w} must be divisible by 2^(levels-1) = {f} for the 'same' layout")
        return [(h * 2**l // f, w * 2**l // f) for l in range(self.levels)]

    def output_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Output resolution of each level."""
        k = 2 if self.layout == "upscale" else 1
        return [(a * k, b * k) for a, b in self.level_sizes(h, w)]


# ----------------------------------------------------------------------------------------------
# Building blocks


def wn_conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    """A weight-normalised conv (Salimans & Kingma 2016); the TIM applies it to every conv."""
    return weight_norm(nn.Conv2d(cin, cout, k, padding=k // 2))


def act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


class DenseBlock(nn.Module):
    """Residual dense block: 5 convs, each seeing all earlier features (ESRGAN, TIM Fig. 5b)."""

    def __init__(self, nf: int, gc: int, beta: float):
        super().__init__()
        self.convs = nn.ModuleList(wn_conv(nf + i * gc, gc if i < 4 else nf) for i in range(5))
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            y = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(y, 0.2))
        return x + self.beta * y


class RRDB(nn.Module):
    """Residual-in-residual dense block: 3 dense blocks with an outer residual (TIM Fig. 5a)."""

    def __init__(self, nf: int, gc: int, beta: float):
        super().__init__()
        self.body = nn.Sequential(*(DenseBlock(nf, gc, beta) for _ in range(3)))
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return x + self.beta * self.body(x)


Region = tuple[int, int, int, int]  # (y0, x0, H, W): a tile at (y0, x0) of an H x W image, at a level's resolution


def adain(
    x: Tensor, style: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-5, region: Region | None = None
) -> Tensor:
    """x = (1 + gamma) * InstanceNorm(x) + beta with [gamma, beta] = style (N, 2C), or a grid of them (N, G, G, 2C)
    upsampled to x's size (`style_map`). The statistics (mean, var) are per channel over the whole image."""
    n, c = x.shape[:2]
    if style.ndim == 2:
        gamma, beta = style.view(n, 2 * c, 1, 1).chunk(2, 1)
    else:
        gamma, beta = style_map(style.movedim(-1, 1), x.shape[-2:], region).chunk(2, 1)
    return (1 + gamma) * ((x - mean) * torch.rsqrt(var + eps)) + beta


def style_map(grid: Tensor, size: tuple[int, int], region: Region | None = None) -> Tensor:
    """A grid (N, C, G, G) bilinearly upsampled to `size` (align_corners=False); with `region` = (y0, x0, H, W) the
    window of that size at (y0, x0) of the grid upsampled to H x W, computed for the window alone (tiled inference)."""
    if region is None:
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)

    def weights(g: int, n: int, start: int, length: int) -> Tensor:  # rows of F.interpolate's (n, g) matrix
        src = ((torch.arange(start, start + length, device=grid.device) + 0.5) * (g / n) - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=g - 1)
        frac = (src - lo)[:, None]
        m = torch.zeros(length, g, device=grid.device).scatter_add_(1, lo[:, None], 1 - frac)
        return m.scatter_add_(1, (lo + 1).clamp(max=g - 1)[:, None], frac).to(grid.dtype)

    y0, x0, h, w = region
    rows, cols = weights(grid.shape[-2], h, y0, size[0]), weights(grid.shape[-1], w, x0, size[1])
    return torch.einsum("hg,ncgk,wk->nchw", rows, grid, cols)


class MappingNetwork(nn.Module):
    """Global stream of one level: its code -> w_l; level l > 1 also reads w_1..w_{l-1}.

    A style grid (N, code_dim, G, G) is mapped cell by cell: the Linear layers act on the last dim, so the
    code dim is moved last and w is (N, G, G, width), concatenated with the earlier levels' w cell by cell."""

    def __init__(self, code_dim: int, width: int, layers: int, level: int):
        super().__init__()
        self.first = nn.Linear(code_dim, width)
        self.mix = nn.Linear(width * level, width)  # own first-layer output + w of the earlier levels
        self.rest = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 2))

    def forward(self, style: Tensor, earlier_w: list[Tensor]) -> Tensor:
        if style.ndim == 4:
            style = style.movedim(1, -1)
        h = F.leaky_relu(self.first(style), 0.2)
        h = F.leaky_relu(self.mix(torch.cat([h, *earlier_w], -1)), 0.2)
        for lin in self.rest:
            h = F.leaky_relu(lin(h), 0.2)
        return h


class Level(nn.Module):
    """One module of the tower (TIM Fig. 4)."""

    def __init__(self, cfg: TowerConfig, i: int):
        super().__init__()
        nf, gc = cfg.channels[i], cfg.growth[i]
        image_ch = cfg.in_channels if (i == 0 or cfg.layout == "same") else cfg.out_channels
        prev_nf = cfg.channels[i - 1] if i > 0 else 0
        self.upscale = cfg.layout == "upscale"
        self.mapping = MappingNetwork(cfg.code_dim, cfg.mapping_width, cfg.mapping_layers, i + 1)
        self.conv_in = wn_conv(image_ch + cfg.noise_channels + prev_nf, nf)
        self.rrdbs = nn.ModuleList(RRDB(nf, gc, cfg.residual_scale) for _ in range(cfg.blocks))
        self.styles = nn.ModuleList(nn.Linear(cfg.mapping_width, 2 * nf) for _ in range(cfg.blocks))
        self.conv_trunk = wn_conv(nf, nf)
        # Upsampling: nearest x2, conv, LeakyReLU, conv, LeakyReLU. In the "same" layout it makes the
        # feature handed to the next level (the last level has none); in "upscale" it precedes the head.
        has_up = self.upscale or i < cfg.levels - 1
        self.up = (
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), wn_conv(nf, nf), act(), wn_conv(nf, nf), act())
            if has_up
            else None
        )
        # The authors' colourisation gives the last level the same two convs without the upsampling, and
        # its head reads their output (cfg.final_convs).
        last = i == cfg.levels - 1
        self.refine = (
            nn.Sequential(wn_conv(nf, nf), act(), wn_conv(nf, nf), act()) if cfg.final_convs and last else None
        )
        self.head = wn_conv(nf, cfg.out_channels)
        self.noise_encoder = (
            NoiseEncoder(image_ch, cfg.encoder_noise, cfg.noise_channels) if cfg.noise_encoder else None
        )
        self.output_mode = cfg.output_mode
        self.input_skip = cfg.input_skip

    def output(self, feat: Tensor, image: Tensor) -> Tensor:
        """The head: tanh(conv(feat)) -> this level's output, in [0, 1] (but see "ab_times_l").

        "tanh01": (t + 1) / 2 = sigmoid(2 h) for h = conv(feat). With `input_skip` the head corrects the
        level's input image instead, sigmoid(2 h + logit(image)), the image bilinearly upsampled to the
        output's size: h = 0 returns the image itself, so the low frequencies (the colours) of the input
        reach the output whatever the trunk does, and the level learns only what to add. (The instance
        norms of the AdaINs remove each feature's mean; without this path a level must rebuild the
        image's mean colour through the skip around its trunk, and the LPIPS loss, which normalises
        features across channels, barely penalises it when it does not.)
        "ab_times_l" (the authors' colourisation): the tanh predicts
        t = (a / 127) * max(L, 0.01) for each of a, b, with L = `image`, the level's input lightness L/100;
        the output is chimle's chroma ab01 = (ab + 128) / 255 with ab = 127 * t / max(L, 0.01), what
        `Colorize.rgb` composes with L. Where the authors' a, b leave [-128, 127] (t large where L is
        dark), ab01 leaves [0, 1]; the RGB made from it is clipped as theirs is, so it is not clamped here.
        """
        if self.input_skip:
            if image.shape[-2:] != feat.shape[-2:]:
                image = F.interpolate(image, size=feat.shape[-2:], mode="bilinear", align_corners=False)
            return torch.sigmoid(2 * self.head(feat) + torch.logit(image.float().clamp(1e-3, 1 - 1e-3))).to(feat.dtype)
        t = torch.tanh(self.head(feat))
        if self.output_mode == "ab_times_l":
            return (t / image.clamp(min=0.01) * 127.0 + 128.0) / 255.0
        return (t + 1) / 2

    def forward(
        self,
        image: Tensor,
        z: Component,
        prev_feature: Tensor | None,
        earlier_w: list[Tensor],
        stats: NormStats | None = None,
        region: Region | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns (output image in [0, 1], feature at 2x for the next level, w of this level).

        `stats` overrides the instance-norm statistics of the AdaINs (see `NormStats`); `region` says which
        window of the whole image this input is, for a style grid (tiled inference; see `TowerModel.step`).
        """
        w = self.mapping(z.style, earlier_w)
        noise = z.noise.to(image.dtype)
        if self.noise_encoder is not None:  # z.noise is the low-dimensional noise; the encoder reads the layout
            noise = self.noise_encoder(image, noise)
        parts = [image, noise]
        if prev_feature is not None:
            parts.append(prev_feature)
        feat = self.conv_in(torch.cat(parts, 1))
        x = feat
        for j, (rrdb, style) in enumerate(zip(self.rrdbs, self.styles)):
            x = rrdb(x)
            if stats is not None and stats.fixed:
                mean, var = stats.values[j]
            else:
                var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, unbiased=False)
                if stats is not None:
                    stats.values.append((mean, var))
            x = adain(x, style(w), mean, var, region=region)
        feat = feat + self.conv_trunk(x)
        if self.upscale:
            feat = self.up(feat)
            return self.output(feat, image), feat, w
        if self.refine is not None:  # the last level: nothing to hand on
            return self.output(self.refine(feat), image), None, w
        out = self.output(feat, image)
        return out, (self.up(feat) if self.up is not None else None), w


@dataclass
class NormStats:
    """Instance-norm statistics (mean, var), each (N, C, 1, 1), of one level's AdaINs.

    fixed=False records the statistics a pass computes; fixed=True makes a pass use the given ones.
    Tiled inference needs this: AdaIN normalises over the whole image, so every tile must use the
    whole image's statistics or its tone drifts from tile to tile.
    """

    values: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    fixed: bool = False


class LevelState(NamedTuple):
    """What level l+1 needs from levels 1..l: lets the search run one level at a time."""

    inputs: list[Tensor]  # the conditioning input at every level's resolution
    feature: Tensor | None  # feature handed to the next level (already upsampled)
    ws: list[Tensor]  # w_1..w_l of the global streams
    output: Tensor | None  # the level-l output (the partial output)

    def index(self, idx: Tensor) -> LevelState:
        """Rows `idx` of the batch (used to expand one input's state over m candidates)."""
        take = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        return LevelState(
            [take(t) for t in self.inputs], take(self.feature), [take(w) for w in self.ws], take(self.output)
        )


class TowerModel(nn.Module):
    """The Tower Implicit Model. `forward(x, codes)` returns one output per level, each in [0, 1]."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(Level(cfg, i) for i in range(cfg.levels))
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming init that reaches the weight-normalised convs.

        Weight norm stores weight = g * v / ||v||; writing `.weight` (as the authors' code does) is
        overwritten on the next access. We init the direction v and set g = scale * ||v||, so the
        effective weight is exactly scale * kaiming. Convs inside dense blocks get scale 0.1 (ESRGAN)
        so the deep residual stack starts close to the identity, and so do the output heads, so
        that the tanh starts unsaturated.
        """
        for name, m in self.named_modules():
            if ".noise_encoder." in name:  # cIMLE's encoder keeps its own (authors') initialisation
                continue
            if isinstance(m, nn.Conv2d):
                scale = 0.1 if (".body." in name or name.endswith(".head")) else 1.0
                v = m.parametrizations.weight.original1
                nn.init.kaiming_normal_(v, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
                m.parametrizations.weight.original0.copy_(scale * v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        for level in self.levels:  # AdaIN starts as plain instance norm: gamma = beta = 0
            for style in level.styles:
                style.weight.mul_(0.01)

    # -- latent codes ---------------------------------------------------------------------------
    def latent_layout(self, input_hw: tuple[int, int] | None = None) -> LatentLayout:
        h, w = input_hw if input_hw is not None else (self.cfg.input_size, self.cfg.input_size)
        noise = self.cfg.encoder_noise if self.cfg.noise_encoder else self.cfg.noise_channels
        return LatentLayout(self.cfg.code_dim, noise, tuple(self.cfg.level_sizes(h, w)), self.cfg.style_grid)

    def sample_codes(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        input_hw: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> Codes:
        """Draw whole codes z ~ N(0, I), one component per level, for inputs of size `input_hw`."""
        device = device if device is not None else self.device
        return self.latent_layout(input_hw).sample(batch_size, generator, device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward --------------------------------------------------------------------------------
    def initial_state(self, x: Tensor) -> LevelState:
        """Check x and build the input pyramid (coarsest first)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"input must be (N, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        sizes = self.cfg.level_sizes(*x.shape[-2:])
        inputs = [x] if self.cfg.layout == "upscale" else [resize(x, s) for s in sizes]
        return LevelState(inputs, None, [], None)

    def step(
        self, level: int, state: LevelState, z: Component, stats: NormStats | None = None, region: Region | None = None
    ) -> LevelState:
        """Run `level` (1-based) on top of the state left by levels 1..level-1.

        `region` = (y0, x0, H, W) at this level's input resolution: the state is a tile at (y0, x0) of an image of
        H x W, whose style grid (`style_grid` > 1) spans the whole image (`chimle.inference.tiling`)."""
        if self.cfg.layout == "upscale" and level > 1:
            image = state.output
            if self.cfg.feedback == "tanh":  # the authors' SR feeds the raw tanh: recover it from (t + 1) / 2
                image = 2 * image - 1
        else:
            image = state.inputs[level - 1]
        out, feat, w = self.levels[level - 1](
            image, z, None if level == 1 else self.cfg.feature_scale * state.feature, state.ws, stats, region
        )
        return LevelState(state.inputs, feat, [*state.ws, w], out)

    def forward(self, x: Tensor, codes: Codes, stats: list[NormStats] | None = None) -> list[Tensor]:
        """Outputs of levels 1..len(codes) (a code may cover fewer levels than the tower has).

        `stats`, one `NormStats` per level, records or fixes the AdaIN statistics (tiled inference).
        """
        if not 1 <= len(codes) <= self.cfg.levels:
            raise ValueError(f"codes must have 1..{self.cfg.levels} components, got {len(codes)}")
        state, outs = self.initial_state(x), []
        for level, z in enumerate(codes, 1):
            state = self.step(level, state, z, None if stats is None else stats[level - 1])
            outs.append(state.output)
        return outs

    def partial(self, x: Tensor, codes: Codes, level: int) -> Tensor:
        """The partial output of `level`: runs levels 1..level only (CHIMLE "partial evaluation")."""
        return self.forward(x, codes[:level])[-1]

    def num_parameters(self, level: int | None = None) -> int:
        params = self.parameters() if level is None else self.levels[level - 1].parameters()
        return sum(p.numel() for p in params)

    def mapping_parameters(self) -> list[nn.Parameter]:
        """Parameters of the global streams' mapping networks (trained at lr x 0.01, as the authors)."""
        return [p for lv in self.levels for p in lv.mapping.parameters()]


class NoiseEncoder(nn.Module):
    """cIMLE's noise encoder (IJCV 2020), Sect. 5.2.1: "a 3-layer convolutional net that takes the
    segmentation x and a lower-dimensional noise vector z~ as input and outputs a noise vector z' of the
    same size as z"; Sect. 5.2.5: noise z~ of 10 channels, output z' of 10 channels, "the number of
    output channels in the intermediate layers is 100". (Sect. 5.2.5 gives the segmentation 30
    channels; in the authors' code 30 is the encoder's whole input, 20 label channels + 10 noise.)

    Kernel sizes, normalisation, activations and initialisation are not in the paper; they follow the
    authors' code (noise_encoder in zth667/Diverse-Image-Synthesis-from-Semantic-Layout, train.py):
    3x3 conv -> layer norm -> LeakyReLU(0.2), twice, then a linear 1x1 conv; weights drawn from a
    normal truncated at 2 std with std 0.15, no bias before a norm. GroupNorm(1, C) is TF-slim's
    layer_norm (statistics over C, H, W per image, per-channel affine)."""

    def __init__(self, seg_channels: int, noise_channels: int = 10, out_channels: int = 10, hidden: int = 100):
        super().__init__()
        self.seg_channels, self.noise_channels = seg_channels, noise_channels
        self.net = nn.Sequential(
            nn.Conv2d(seg_channels + noise_channels, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(1, hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(1, hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, out_channels, 1),
        )
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.15, a=-0.3, b=0.3)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, seg: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """seg (N, seg_channels, H, W), e.g. one-hot labels; noise (N, noise_channels, H, W), drawn
        from N(0, I) when omitted. Returns z' (N, out_channels, H, W)."""
        n, _, h, w = seg.shape
        if noise is None:
            noise = torch.randn(n, self.noise_channels, h, w, generator=generator, device=seg.device, dtype=seg.dtype)
        if seg.shape[1] != self.seg_channels or noise.shape != (n, self.noise_channels, h, w):
            raise ValueError(
                f"expected seg (N, {self.seg_channels}, H, W) and noise (N, {self.noise_channels}, H, W), "
                f"got {tuple(seg.shape)} and {tuple(noise.shape)}"
            )
        return self.net(torch.cat([seg, noise.to(seg.dtype)], 1))
