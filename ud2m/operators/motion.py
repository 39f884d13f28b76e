r"""Motion-blur kernels from random camera trajectories, and the :class:`MotionBlur` operator (docs/method.md §2.7,
§2.8).

Two trajectory models, both splatted bilinearly onto a :math:`k \times k` grid and normalised to sum 1:

* **random walk** (DPS / LATINO "motion blur", ``size`` and ``intensity``): a unit-speed path whose heading turns
  with an angular velocity that has inertia. This is our own model of the idea, so kernels are not bit-identical to
  the reference ones; runs store the kernels they used (§1.5).
* **Gaussian process** (UD2M [ref]): x and y are independent GPs on ``num_points`` points of [0, 1] with
  squared-exponential covariance :math:`k(t, t') = \sigma^2 \exp(-(t - t')^2 / (2 l^2))` (l = 0.1, σ = 0.5).

Trajectories are ``(B, N, 2)`` tensors of (row, column) positions; every sample is drawn from ``generator`` and
the batch is processed at once (the only loop is over the steps of the random walk).
"""

from __future__ import annotations

import functools
import math

import torch

from ud2m.operators.blur import KernelBlur
from ud2m.operators.kernels import as_kernel
from ud2m.utils import rand, randn

MOTION_KINDS = ("walk", "gp")


def _check_size(size: int) -> None:
    if int(size) != size or size < 2:
        raise ValueError(f"motion kernel: size must be an integer >= 2, got {size}")


def splat_bilinear(points: torch.Tensor, size: int) -> torch.Tensor:
    r"""Accumulate equally weighted points onto a ``size x size`` grid with bilinear weights, then normalise.

    A point at (r, c) gives weight :math:`(1 - f_r)(1 - f_c)` to pixel :math:`(\lfloor r \rfloor, \lfloor c
    \rfloor)` and the complementary weights to its three neighbours, so each point deposits exactly its mass.

    Args:
        points: ``(B, N, 2)`` (row, column) positions in ``[0, size - 1]``.
        size: kernel side k.

    Returns:
        ``(B, 1, k, k)`` float32 kernels, non-negative, each summing to 1.
    """
    B = points.shape[0]
    p = points.clamp(0, size - 1)
    base = p.floor().clamp(max=size - 2)  # (B, N, 2); a point on the last row/column keeps weight 1 - f = 0 there
    f = p - base
    i, j = base[..., 0].long(), base[..., 1].long()
    fr, fc = f[..., 0], f[..., 1]
    index = torch.cat([i * size + j, i * size + j + 1, (i + 1) * size + j, (i + 1) * size + j + 1], dim=1)
    weight = torch.cat([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=1)
    grid = torch.zeros(B, size * size, dtype=points.dtype, device=points.device).scatter_add_(1, index, weight)
    return as_kernel(grid.reshape(B, 1, size, size).float(), name="motion kernel")


def fit_to_support(points: torch.Tensor, size: int, *, half_extent: float | None = None) -> torch.Tensor:
    r"""Centre each trajectory's bounding box on the kernel centre and scale it into the ``size x size`` support.

    With ``half_extent=None`` the larger side of the bounding box is stretched to ``size - 1`` (the path fills
    the support). Otherwise ``points`` are in units where ``half_extent`` is the half-support; a trajectory
    that would leave the support is shrunk to fit (never enlarged).

    Args:
        points: ``(B, N, 2)`` trajectories in arbitrary units.
        size: kernel side k.
        half_extent: optional value that maps to the half-side ``(k - 1) / 2``.

    Returns:
        ``(B, N, 2)`` positions in pixel units within ``[0, k - 1]``.
    """
    lo, hi = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)  # (B, 1, 2)
    centred = points - (lo + hi) / 2
    radius = ((hi - lo) / 2).amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, 1, 1)
    if half_extent is None:
        scale = 1.0 / radius
    else:
        scale = (1.0 / radius).clamp(max=1.0 / half_extent)
    return (size - 1) / 2 * (1 + centred * scale)


def walk_trajectory(
    num_steps: int,
    intensity: float,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    memory: float = 0.1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Unit-speed camera-shake paths whose heading turns with an inertial angular velocity.

    Heading :math:`\theta_t = \theta_{t-1} + \omega_t` with :math:`\omega_t = \rho\,\omega_{t-1} + s\,\epsilon_t`,
    :math:`\epsilon_t \sim \mathcal N(0, 1)`, :math:`\theta_0 \sim U[0, 2\pi)`, position
    :math:`p_t = \sum_{u \le t} (\sin\theta_u, \cos\theta_u)`. The inertia is :math:`\rho = 1 - 1/(\text{memory}
    \cdot T)` (turning rates stay correlated over a fraction ``memory`` of the path), and
    :math:`s = 2\pi\,\text{intensity}\,(1 - \rho)/\sqrt T`, so the heading's total drift has std about
    :math:`2\pi\cdot\text{intensity}` radians: ``intensity = 0`` is a straight line, 0.5 a curved stroke, 1 a
    scribble.

    Args:
        num_steps: number T of unit steps.
        intensity: non-negative shake intensity.
        batch_size: number B of independent paths.
        generator: source of all randomness.
        memory: correlation length of the turning rate as a fraction of the path, in (0, 1].
        device: device of the result.

    Returns:
        ``(B, T, 2)`` float64 (row, column) positions.
    """
    if intensity < 0:
        raise ValueError(f"walk_trajectory: intensity must be >= 0, got {intensity}")
    if not 0 < memory <= 1:
        raise ValueError(f"walk_trajectory: memory must be in (0, 1], got {memory}")
    T = int(num_steps)
    rho = max(0.0, 1.0 - 1.0 / (memory * T))
    s = 2 * math.pi * intensity * (1 - rho) / math.sqrt(T)
    theta0 = 2 * math.pi * rand((batch_size, 1), generator, device=device, dtype=torch.float64)
    eps = randn((batch_size, T), generator, device=device, dtype=torch.float64)
    omega = torch.zeros(batch_size, dtype=torch.float64, device=eps.device)
    rates = []
    for t in range(T):  # AR(1) recursion over steps, batched over samples
        omega = rho * omega + s * eps[:, t]
        rates.append(omega)
    theta = theta0 + torch.cumsum(torch.stack(rates, dim=1), dim=1)  # (B, T)
    return torch.cumsum(torch.stack([torch.sin(theta), torch.cos(theta)], dim=-1), dim=1)


@functools.lru_cache(maxsize=8)
def se_cholesky(num_points: int, length_scale: float, std: float, jitter: float = 1e-6) -> torch.Tensor:
    r"""Cholesky factor of the squared-exponential covariance on ``num_points`` points of [0, 1] (float64, CPU).

    :math:`K_{ij} = \sigma^2 \exp(-(t_i - t_j)^2 / (2 l^2)) + \delta\sigma^2 \mathbb 1_{i=j}`; the jitter
    :math:`\delta` (relative to :math:`\sigma^2`) makes the numerically rank-deficient K positive definite and is
    multiplied by 10 until the factorisation succeeds. Cached: the result is shared, never modify it in place.
    """
    t = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    K = std**2 * torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * length_scale**2))
    eye = torch.eye(num_points, dtype=torch.float64)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(K + jitter * std**2 * eye)
        if int(info) == 0:
            return L
        jitter *= 10
    raise ValueError(f"se_cholesky: covariance (l={length_scale}, std={std}, n={num_points}) is not factorisable")


def gp_trajectory(
    num_points: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    length_scale: float = 0.1,
    std: float = 0.5,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Independent GP samples for the row and column coordinates, :math:`g = L\epsilon`, :math:`LL^\top = K`.

    Args:
        num_points: number N of points of [0, 1].
        batch_size: number B of trajectories.
        generator: source of all randomness.
        length_scale: SE length-scale l.
        std: marginal std σ.
        device: device of the result.

    Returns:
        ``(B, N, 2)`` float64 trajectories.
    """
    if length_scale <= 0 or std <= 0:
        raise ValueError(f"gp_trajectory: length_scale and std must be > 0, got {length_scale} and {std}")
    eps = randn((batch_size, 2, num_points), generator, device=device, dtype=torch.float64)
    L = se_cholesky(int(num_points), float(length_scale), float(std)).to(eps.device)
    return (eps @ L.T).transpose(1, 2)  # (B, N, 2)


def motion_kernel_walk(
    size: int,
    intensity: float,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    *,
    num_steps: int | None = None,
    memory: float = 0.1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random-walk (camera-shake) motion kernels in the spirit of DPS/LATINO; see :func:`walk_trajectory`.

    The path's bounding box is centred and its larger side stretched to ``size - 1``, then splatted.

    Args:
        size: kernel side k (122 at 1024², 61 at 256²).
        intensity: shake intensity (0.5 in the presets).
        batch_size: number of kernels.
        generator: source of all randomness.
        num_steps: path length T (default ``8 * size``, i.e. at most about one pixel per step for typical paths).
        memory: see :func:`walk_trajectory`.
        device: device of the result.

    Returns:
        ``(B, 1, k, k)`` float32 kernels summing to 1.
    """
    _check_size(size)
    T = 8 * size if num_steps is None else num_steps
    points = walk_trajectory(T, intensity, batch_size, generator, memory=memory, device=device)
    return splat_bilinear(fit_to_support(points, size), size)


def motion_kernel_gp(
    size: int,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    length_scale: float = 0.1,
    std: float = 0.5,
    num_points: int = 1000,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Gaussian-process motion kernels (UD2M [ref]); see :func:`gp_trajectory`.

    Scaling **[ours]**: the trajectory's bounding box is centred on the kernel centre and GP value 1 maps to the
    half-side :math:`(k - 1)/2`, so ``std`` sets the typical blur length relative to the support; a trajectory
    that would leave the support is shrunk to fit.

    Args:
        size: kernel side k.
        batch_size: number of kernels.
        generator: source of all randomness.
        length_scale: SE length-scale l on [0, 1].
        std: GP marginal std σ.
        num_points: number of trajectory points.
        device: device of the result.

    Returns:
        ``(B, 1, k, k)`` float32 kernels summing to 1.
    """
    _check_size(size)
    points = gp_trajectory(num_points, batch_size, generator, length_scale=length_scale, std=std, device=device)
    return splat_bilinear(fit_to_support(points, size, half_extent=1.0), size)


class MotionBlur(KernelBlur):
    """Circular motion blur with kernels drawn once, at construction, from a generator seeded by ``seed``.

    The kernels are a buffer, so they are saved with the module and a run can be replayed exactly (§1.5).

    Args:
        size: kernel side (61 at 256², 122 at 1024²).
        intensity: random-walk shake intensity (unused by ``kind="gp"``).
        kind: ``"walk"`` (DPS/LATINO) or ``"gp"`` (UD2M).
        batch_size: number of kernels (1 = shared by the batch).
        seed: seed of the draw.
        length_scale: GP length-scale (``kind="gp"``).
        std: GP std (``kind="gp"``).
        **kwargs: :class:`KernelBlur` options (CG settings).
    """

    def __init__(
        self,
        size: int = 61,
        intensity: float = 0.5,
        *,
        kind: str = "walk",
        batch_size: int = 1,
        seed: int = 0,
        length_scale: float = 0.1,
        std: float = 0.5,
        **kwargs,
    ) -> None:
        if kind not in MOTION_KINDS:
            raise ValueError(f"MotionBlur: kind must be one of {MOTION_KINDS}, got {kind!r}")
        gen = torch.Generator().manual_seed(seed)
        if kind == "walk":
            kernel = motion_kernel_walk(size, intensity, batch_size, gen)
        else:
            kernel = motion_kernel_gp(size, batch_size, gen, length_scale=length_scale, std=std)
        super().__init__(kernel, **kwargs)
