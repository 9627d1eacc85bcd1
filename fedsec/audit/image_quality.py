"""Image quality of a reconstruction: PSNR, SSIM, pixel space, a random guess.

The gradient-inversion audit (:mod:`fedsec.audit.inversion`) scores what the
server reconstructs in pixel space (``[0, 1]``, :func:`to_pixels`) by
:func:`psnr` and by :func:`ssim` (Wang, Bovik, Sheikh and Simoncelli, "Image
Quality Assessment: From Error Visibility to Structural Similarity", IEEE
Transactions on Image Processing 13(4), 2004), against the level of a guess
that knows the data set but not the client (:func:`random_guess_psnr`), as
Geiping et al. ("Inverting Gradients", NeurIPS 2020) report their
reconstructions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias

from fedsec.audit._checks import _check_number
from fedsec.data.datasets import DatasetInfo

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_WINDOW",
    "from_pixels",
    "psnr",
    "random_guess_psnr",
    "ssim",
    "to_pixels",
]

#: Side of the square uniform SSIM window (see :func:`ssim`).
SSIM_WINDOW = 3
#: SSIM stabilising constants of Wang et al. (2004): ``C_i = (K_i * data_range)^2``.
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_image_pair(
    original: torch.Tensor, reconstruction: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    for name, t in (("original", original), ("reconstruction", reconstruction)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be one image [C, H, W], got {shape}")
    if original.shape != reconstruction.shape:
        raise ValueError(
            f"original and reconstruction shapes differ: {tuple(original.shape)} vs "
            f"{tuple(reconstruction.shape)}"
        )
    data_range = _check_number("data_range", data_range, minimum=0.0, strict=True)
    return original.detach().double(), reconstruction.detach().double(), data_range


# ---- image quality ---------------------------------------------------------------


def psnr(original: torch.Tensor, reconstruction: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` of one image, in dB.

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        Images ``[C, H, W]`` of the same shape, in pixel space (e.g. ``[0, 1]``,
        see :func:`to_pixels`).
    data_range : float
        Span of valid pixel values (1.0 for ``[0, 1]`` pixels), > 0.

    Returns
    -------
    float
        PSNR in dB, computed in float64; ``inf`` for identical images.

    Raises
    ------
    ValueError
        If an image is not ``[C, H, W]``, the shapes differ or ``data_range <= 0``.
    """
    x, y, data_range = _check_image_pair(original, reconstruction, data_range)
    mse = float(torch.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _local_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the ``SSIM_WINDOW``-square window around every pixel, reflect-padded."""
    pad = SSIM_WINDOW // 2
    padded = F.pad(t.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    return F.avg_pool2d(padded, SSIM_WINDOW, stride=1).squeeze(0)


def ssim(original: torch.Tensor, reconstruction: torch.Tensor, data_range: float) -> float:
    """Structural similarity index (Wang et al. 2004) of one image, in ``[-1, 1]``.

    The SSIM map of Wang et al. [8]_ (their eq. 13),
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
    with ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` (``L = data_range``),
    averaged over all pixels and channels (each channel on its own).

    Window: the paper's 11x11 Gaussian (sigma 1.5) is wider than an 8x8 digit, so
    the local statistics are taken over a **3x3 uniform window** instead, with
    **reflect padding** so that every pixel, border included, has a full window
    and the map is as large as the image; the (co)variances are the window's
    population moments (divided by 9, not 8). Images must be at least 2x2.

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        Images ``[C, H, W]`` of the same shape, in pixel space.
    data_range : float
        Span of valid pixel values (1.0 for ``[0, 1]`` pixels), > 0.

    Returns
    -------
    float
        Mean SSIM, computed in float64; 1.0 for identical images.

    Raises
    ------
    ValueError
        If an image is not ``[C, H, W]`` with ``H, W >= 2``, the shapes differ or
        ``data_range <= 0``.
    """
    x, y, data_range = _check_image_pair(original, reconstruction, data_range)
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"ssim needs images of at least 2x2 pixels, got {tuple(x.shape)}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x = _local_mean(x * x) - mu_x**2
    var_y = _local_mean(y * y) - mu_y**2
    cov = _local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def _pixel_stats(
    info: DatasetInfo, t: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    channels = info.input_shape[0]
    if not isinstance(t, torch.Tensor) or t.dim() < 3 or t.shape[-3] != channels:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{what} must be [..., {channels}, H, W] for dataset '{info.name}', got {shape}"
        )
    for field, values in (("pixel_mean", info.pixel_mean), ("pixel_std", info.pixel_std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"{field} of dataset '{info.name}' needs 1 or {channels} values, got {values}"
            )
    if not all(s > 0 for s in info.pixel_std):
        raise ValueError(f"pixel_std of dataset '{info.name}' must be > 0, got {info.pixel_std}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    mean = torch.tensor(info.pixel_mean, dtype=dtype, device=t.device)
    std = torch.tensor(info.pixel_std, dtype=dtype, device=t.device)
    shape = (channels, 1, 1)
    return mean.expand(channels).reshape(shape), std.expand(channels).reshape(shape)


def to_pixels(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map normalised inputs to ``[0, 1]`` pixels: ``x * pixel_std + pixel_mean``.

    The inverse of the loaders' ``(pixel - mean) / std``; no clamping, so
    inputs outside :func:`fedsec.data.datasets.pixel_bounds` map outside
    ``[0, 1]``.

    Parameters
    ----------
    x : torch.Tensor
        Inputs ``[..., C, H, W]`` (one image or a batch) of data set ``info``.
    info : DatasetInfo
        Supplies ``pixel_mean``/``pixel_std`` (one value or one per channel).

    Returns
    -------
    torch.Tensor
        Pixels, same shape.

    Raises
    ------
    ValueError
        If ``x`` does not have ``info``'s channel count in dimension -3, or the
        statistics are malformed.
    """
    mean, std = _pixel_stats(info, x, "x")
    return x * std + mean


def from_pixels(p: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map ``[0, 1]`` pixels to the model's inputs: ``(p - pixel_mean) / pixel_std``.

    The inverse of :func:`to_pixels`; parameters and errors as there.
    """
    mean, std = _pixel_stats(info, p, "p")
    return (p - mean) / std


def random_guess_psnr(original: torch.Tensor, pool: torch.Tensor, info: DatasetInfo) -> float:
    """PSNR of a random guess: the mean PSNR of ``original`` against other images of the set.

    The reference level of a reconstruction attack: an attacker who knows the
    data distribution but learned nothing about the client's example can still
    output *some* image of the data set. This is the expected PSNR of such a
    draw -- the mean, over the images of ``pool``, of ``psnr(original, image)``
    in ``[0, 1]`` pixel space. Pool images identical to ``original`` are skipped
    (a draw that happens to be a duplicate says nothing about the attack). A
    reconstruction that scores no better than this has not revealed the image.

    Parameters
    ----------
    original : torch.Tensor
        The client's image ``[C, H, W]``, normalised as the data set's inputs.
    pool : torch.Tensor
        Other images of the same data set ``[N, C, H, W]``, normalised (e.g.
        the server's held-out test split).
    info : DatasetInfo
        The data set, for :func:`to_pixels`.

    Returns
    -------
    float
        Mean PSNR in dB.

    Raises
    ------
    ValueError
        On mismatched shapes, or if the pool holds no image other than ``original``.
    """
    if not isinstance(original, torch.Tensor) or original.dim() != 3:
        raise ValueError("original must be one image [C, H, W]")
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or pool.shape[1:] != original.shape:
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(f"pool must be [N, {', '.join(map(str, original.shape))}], got {shape}")
    target = to_pixels(original.detach().double(), info)
    images = to_pixels(pool.detach().double(), info)
    values = [psnr(target, img, 1.0) for img in images if not torch.equal(img, target)]
    if not values:
        raise ValueError("pool holds no image other than the original")
    return sum(values) / len(values)
