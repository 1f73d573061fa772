"""Image formation: from line integrals to detector counts.

For view ``i`` with gold path image ``g`` (attenuation exponent) and content
image ``c`` (protein-density path, pixels) the expected electrons per pixel are

    N = D_i (a / s_i)^2 exp(-L_i / lambda) exp(-g) exp(-2 phi_px (h * c))

with ``D_i`` the view's dose in e/Å², ``a`` the pixel size in Å, ``L_i`` the
path through the ice, ``lambda`` the inelastic mean free path, ``phi_px`` the
phase shift per pixel of protein path and ``h`` the phase contrast transfer
function (a delta, i.e. ideal phase contrast, when the CTF is off); to first
order ``exp(-2 h*phi) = 1 - 2 h*phi``, the weak-phase image. Gold is strongly
absorbing, so beads are dark. Specimen drift during the exposure (a linear
smear) and the detector point spread act on ``N``; then Poisson shot noise and
Gaussian read noise are drawn.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft

from simtomo.config import DetectorConfig, OpticsConfig
from simtomo.errors import ConfigError

__all__ = [
    "electron_wavelength_A",
    "phase_per_px",
    "ctf",
    "frequency_grid",
    "expected_counts",
    "add_noise",
    "log_intensity",
]


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kV * 1e3
    return 12.2643 / np.sqrt(v * (1.0 + 0.978476e-6 * v))


def phase_per_px(config) -> float:
    """Phase shift per pixel of protein-density path, radians (``specimen.phase_per_nm`` at the pixel size)."""
    return config.specimen.phase_per_nm * config.detector.pixel_size_A / 10.0


def frequency_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (kx, ky) in cycles per pixel on the ``rfft2`` grid of an image of ``shape``."""
    h, w = shape
    return fft.rfftfreq(w)[None, :], fft.fftfreq(h)[:, None]


def ctf(shape: tuple[int, int], pixel_size_A: float, optics: OpticsConfig) -> np.ndarray:
    """Phase contrast transfer ``sqrt(1 - A^2) sin(chi) + A cos(chi)`` on the ``rfft2`` grid.

    ``chi(k) = pi lambda df k^2 - pi/2 Cs lambda^3 k^4`` with underfocus ``df``
    positive, so that at low frequency in underfocus protein appears dark.
    """
    kx, ky = frequency_grid(shape)
    k2 = (kx**2 + ky**2) / pixel_size_A**2
    lam = electron_wavelength_A(optics.voltage_kV)
    chi = np.pi * lam * optics.defocus_um * 1e4 * k2 - 0.5 * np.pi * optics.cs_mm * 1e7 * lam**3 * k2**2
    a = optics.amplitude_contrast
    return np.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)


def _filter(image: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    return fft.irfft2(fft.rfft2(image, workers=1) * transfer, s=image.shape, workers=1)


def expected_counts(
    gold: np.ndarray,
    content: np.ndarray,
    *,
    dose_e_per_A2: float,
    mag: float,
    ice_path_px: float,
    phase_per_px: float,
    detector: DetectorConfig,
    optics: OpticsConfig,
    motion_px: np.ndarray | None = None,
    ctf_transfer: np.ndarray | None = None,
) -> np.ndarray:
    """Noise-free electrons per pixel of one view (float64).

    Parameters
    ----------
    gold : (h, w)
        Attenuation exponent of gold along each ray.
    content : (h, w)
        Protein-density path length along each ray, pixels.
    dose_e_per_A2 : float
        Dose of this view.
    mag : float
        Magnification of the view; a magnified view spreads the dose over more pixels.
    ice_path_px : float
        Path through the ice along the beam, pixels.
    phase_per_px : float
        Phase shift per pixel of protein path, radians.
    motion_px : (2,), optional
        Linear specimen drift during the exposure, start to end, pixels.
    ctf_transfer : array, optional
        Precomputed :func:`ctf` (used when ``optics.ctf`` is true).
    """
    px_nm = detector.pixel_size_A / 10.0
    exponent = 2.0 * phase_per_px * content
    if optics.ctf:
        transfer = ctf_transfer if ctf_transfer is not None else ctf(content.shape, detector.pixel_size_A, optics)
        exponent = _filter(exponent, transfer)
    exponent += gold
    flux = dose_e_per_A2 * (detector.pixel_size_A / mag) ** 2 * np.exp(-ice_path_px * px_nm / optics.ice_mean_free_path_nm)
    # in place: at 4096^2 px every temporary is 134 MB of fresh pages
    counts = np.exp(np.negative(exponent, out=exponent), out=exponent)
    counts *= flux
    blur = motion_px is not None and np.any(motion_px != 0)
    if blur or detector.mtf_sigma_px > 0:
        kx, ky = frequency_grid(counts.shape)
        transfer = np.ones(np.broadcast_shapes(kx.shape, ky.shape))
        if blur:
            # a uniform smear along d, centred on the mid-exposure position
            transfer = transfer * np.sinc(kx * motion_px[0] + ky * motion_px[1])
        if detector.mtf_sigma_px > 0:
            transfer = transfer * np.exp(-2.0 * np.pi**2 * detector.mtf_sigma_px**2 * (kx**2 + ky**2))
        counts = np.maximum(_filter(counts, transfer), 0.0)
    return counts


def add_noise(counts: np.ndarray, detector: DetectorConfig, rng: np.random.Generator) -> np.ndarray:
    """Detector image: Poisson shot noise on ``counts`` plus Gaussian read noise, float32."""
    image = rng.poisson(counts).astype(np.float32) if detector.poisson_noise else counts.astype(np.float32)
    if detector.read_noise_e > 0:
        image += rng.normal(0.0, detector.read_noise_e, counts.shape).astype(np.float32)
    return image


def log_intensity(stack: np.ndarray, *, first_view: int = 0) -> np.ndarray:
    """Line-integral images ``-log(I / I0)`` of electron counts: what a reconstruction inverts.

    Parameters
    ----------
    stack : (n, h, w) or (h, w) array
        Counts per pixel. Values below 0.5 are raised to 0.5 so that empty
        pixels stay finite.
    first_view : int
        Index of the first given view in its series, for error messages only
        (a stack converted view by view still names the right view).

    Returns
    -------
    float32 array of the same shape
        ``-log(max(I, 0.5) / I0)`` with ``I0`` the mean count of each view:
        dense content and gold are positive.

    Raises
    ------
    ConfigError
        For an empty or non-3-D stack, NaN or infinite counts, or a view whose
        mean is not positive (the message names the view index).
    """
    arr = np.asarray(stack)
    if arr.ndim == 2:
        return log_intensity(arr[None], first_view=first_view)[0]
    if arr.ndim != 3 or arr.size == 0:
        raise ConfigError(f"stack: expected a non-empty (n, h, w) or (h, w) array of counts, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ConfigError(f"stack: expected real counts, got dtype {arr.dtype}")
    out = np.empty(arr.shape, dtype=np.float32)
    for i in range(arr.shape[0]):
        view = arr[i]
        mean = float(view.mean(dtype=np.float64))
        if not math.isfinite(mean):
            raise ConfigError(f"stack: view {first_view + i} contains NaN or infinite counts")
        if mean <= 0.0:
            raise ConfigError(f"stack: view {first_view + i} has mean count {mean:g}; expected a positive mean (I0)")
        o = out[i]
        np.maximum(view, 0.5, out=o, casting="same_kind")
        np.log(o, out=o)
        np.subtract(np.float32(math.log(mean)), o, out=o)
    return out
