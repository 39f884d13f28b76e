"""LVTINO (docs/method.md §6) and the video views of image priors (ud2m/priors/stacked.py).

Tiny random pixel priors stand in for the video prior (a UNet over frames stacked along channels, the layout of the
project's own clip prior) and the image prior. Every expected value is derived: NFE counts from §6.4-§6.5, the last
data step's optimality condition (§6.3), `project_cg`'s first iterate and limits (§2.4), the frame-wise fallback
against `latino` on each video's frames (§4.2), the Adam step against autograd, and per-video independence (§1.5).
The adjointness and prox identities of the A/B/C operators are in tests/test_video_operators.py; `project_cg`, which
no other test covers, is checked here on them.
"""

import dataclasses
import itertools
import math

import pytest
import torch

from ud2m.operators import Compose, Denoising, SuperResolution, measure, sigma_internal
from ud2m.operators.video import PerFrame, TemporalBlur, lvtino_problem_a, lvtino_problem_b, lvtino_problem_c
from ud2m.priors.stacked import FrameStackedPrior, FrameWisePrior
from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior
from ud2m.solvers.latino_algorithms import latino
from ud2m.solvers.lvtino import (
    LVTINO_SCHEDULES,
    T_IMAGE_AB,
    DataStep,
    LVTINOStep,
    data_step,
    data_step_adam,
    generic_schedule,
    lvtino,
)
from ud2m.solvers.tv import forward_diff, reg_weights

SIGMA_Y = 0.001
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny FFTs are slow on shared threads


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def video(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def priors9():
    """A 9-frame stacked video prior (27 channels) and an RGB image prior, 32x32 (problems A, B, C)."""
    return FrameStackedPrior(tiny_pixel_prior(in_channels=27, sample_size=32, seed=1), 9), tiny_pixel_prior(seed=2)


@pytest.fixture(scope="module")
def priors5():
    """A 5-frame stacked video prior (15 channels) and an RGB image prior, 16x16."""
    return FrameStackedPrior(tiny_pixel_prior(in_channels=15, seed=3), 5), tiny_pixel_prior(seed=4)


@pytest.fixture
def priors5_64(priors5):
    """float64 copies of ``priors5``: identities that hold up to round-off are checked at 1e-10, not at fp32's 1e-6
    (a batched convolution is not bitwise independent of the batch size)."""
    return FrameStackedPrior(tiny_pixel_prior(in_channels=15, seed=3).double(), 5), tiny_pixel_prior(seed=4).double()


def _problem(name, T):
    problems = {"A": lambda: lvtino_problem_a(T), "B": lvtino_problem_b, "C": lambda: lvtino_problem_c(T)}
    return problems[name.removesuffix("_fast")]()  # A_fast: problem A with faster data steps


# ---------------------------------------------------------------------------------------------- operators (§2.4)
@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_project_cg_on_lvtino_operators(name):
    """``project_cg`` (§2.4) on the circular A/B/C operators: 0 iterations return z; one is the exact line search
    z + a r, r = A^T(y - Az), a = |r|^2 / (|Ar|^2 + eps |r|^2); many converge to the minimiser of
    |Ax - y|^2 + eps |x - z|^2, i.e. prox_l2(z, y, 1/eps). With eps = 0 and consistent y the residual |Ax_k - y| falls
    monotonically (CGLS minimises it over the Krylov space) and the iterate tends to the projection of z."""
    op = {"A": lvtino_problem_a(9, padding="circular"), "B": lvtino_problem_b(padding="circular"),
          "C": lvtino_problem_c(9, padding="circular")}[name].double()  # fmt: skip
    for m in op.modules():
        m.cg_rtol, m.cg_max_iter = 1e-14, 3000
    z = video((2, 3, 9, 32, 32), 0).double()
    y = op.A(video(z.shape, 1).double())
    torch.testing.assert_close(op.project_cg(z, y, iters=0), z, rtol=0, atol=0)
    eps = 0.05
    r = op.A_adjoint(y - op.A(z))
    a = r.flatten(1).square().sum(1) / (op.A(r).flatten(1).square().sum(1) + eps * r.flatten(1).square().sum(1))
    torch.testing.assert_close(op.project_cg(z, y, iters=1, eps=eps), z + a[:, None, None, None, None] * r)
    torch.testing.assert_close(op.project_cg(z, y, iters=300, eps=eps), op.prox_l2(z, y, 1 / eps), rtol=0, atol=1e-8)
    residuals = [(op.A(op.project_cg(z, y, iters=k)) - y).norm() for k in range(6)]
    assert all(later < earlier for earlier, later in itertools.pairwise(residuals))
    k = next(k for k in range(5, 80, 5) if (op.A(op.project_cg(z, y, iters=k)) - y).norm() <= 1e-9 * y.norm())
    torch.testing.assert_close(op.project_cg(z, y, iters=k), op.prox_l2(z, y, math.inf), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- priors
def test_stacked_predict_x0_equals_pixel_prior_on_stacked_frames(priors5):
    """The video estimate is the pixel prior's on the frame-major stack (channels t*C..t*C+2 = frame t)."""
    vp, _ = priors5
    z = video((2, 3, 5, 16, 16), 0)
    t = torch.tensor([300.0, 700.0])
    stacked = torch.cat([z[:, :, i] for i in range(5)], dim=1)  # (B, 15, H, W), frame-major
    expected = vp.pixel_prior.predict_x0(stacked, t)
    vp.reset_nfe()
    out = vp.predict_x0(z, t)
    assert vp.nfe == 1 == vp.pixel_prior.nfe
    for i in range(5):
        torch.testing.assert_close(out[:, :, i], expected[:, 3 * i : 3 * i + 3], rtol=0, atol=0)
    a, b = vp.scales(t)
    a_px, b_px = vp.pixel_prior.scales(t)
    assert torch.equal(a, a_px) and torch.equal(b, b_px) and torch.equal(vp.sigma(t), vp.pixel_prior.sigma(t))
    assert torch.equal(vp.encode(z), z) and torch.equal(vp.decode(z), z) and vp.latent_shape(z.shape) == z.shape
    assert vp.reset_nfe() == 1 and vp.pixel_prior.nfe == 0


def test_stacked_prior_errors_and_loading(priors5, tmp_path):
    vp, _ = priors5
    with pytest.raises(ValueError, match=r"T = 5 frames.*got T = 9"):
        vp.check_shape((1, 3, 9, 16, 16))
    with pytest.raises(ValueError, match=r"C = 3 channels.*got T = 5, C = 1"):
        vp.check_shape((1, 1, 5, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 2, got H = 17, W = 16"):
        vp.check_shape((1, 3, 5, 17, 16))
    with pytest.raises(ValueError, match=r"video \(B, C, T, H, W\)"):
        vp.check_shape((1, 15, 16, 16))
    with pytest.raises(ValueError, match=r"divisor of the UNet's in_channels \(15\), got frames = 4"):
        FrameStackedPrior(vp.pixel_prior, 4)
    save_tiny_pixel_pipeline(tmp_path / "clips", vp.pixel_prior)
    loaded = FrameStackedPrior.from_pretrained(tmp_path / "clips")
    assert loaded.frames == 5 and loaded.frame_channels == 3
    gray = FrameStackedPrior.from_pretrained(tmp_path / "clips", frames=15)
    assert (gray.frames, gray.frame_channels) == (15, 1)
    save_tiny_pixel_pipeline(tmp_path / "four", tiny_pixel_prior(in_channels=4))
    with pytest.raises(ValueError, match=r"in_channels = 4 is not a multiple of 3"):
        FrameStackedPrior.from_pretrained(tmp_path / "four")


def test_framewise_prior_chunks_equal_per_frame_calls(priors5_64):
    """One sweep = ceil(BT / frame_batch) image calls; each frame gets the image prior's own estimate; the latent
    layout is frame-major (B, T, C, H, W)."""
    _, ip = priors5_64
    fw = FrameWisePrior(ip, frame_batch=3)
    x = video((2, 3, 5, 16, 16), 1).double()
    z = fw.encode(x)
    assert z.shape == (2, 5, 3, 16, 16) == fw.latent_shape(x.shape) and torch.equal(z[1, 2], x[1, :, 2])
    t = torch.tensor([200.0, 600.0], dtype=DT)
    ip.reset_nfe()
    out = fw.predict_x0(z, t)
    assert fw.nfe == 1 and ip.nfe == math.ceil(2 * 5 / 3) == fw.calls_per_sweep(2, 5)
    for b in range(2):
        for i in range(5):
            expected = ip.predict_x0(x[b : b + 1, :, i], t[b : b + 1])
            torch.testing.assert_close(out[b : b + 1, i], expected, rtol=0, atol=1e-12)
    assert torch.equal(fw.decode(z), x)
    with pytest.raises(ValueError, match="channels"):
        fw.check_shape((1, 1, 5, 16, 16))


# ---------------------------------------------------------------------------------------------- presets (§6.4)
def test_a_fast_is_a_with_a_quarter_of_the_pdhg_work():
    """A_fast keeps A's times, TV weight and step 4, and runs step 2 over-relaxed (1.9) at the §6.3 step rule for 50
    iterations instead of 200 at tau = sigma = 0.25 (docs/method.md §6.3 revision)."""
    a, fast = LVTINO_SCHEDULES["A"], LVTINO_SCHEDULES["A_fast"]
    assert [(r.t_video, r.t_image, r.image_step) for r in fast] == [(r.t_video, r.t_image, r.image_step) for r in a]
    for r, f in zip(a, fast, strict=True):
        assert (r.video_step.iters, r.video_step.tau, r.video_step.relaxation) == (200, 0.25, 1.0)
        assert (f.video_step.iters, f.video_step.tau, f.video_step.sigma, f.video_step.relaxation) == (
            50,
            None,
            None,
            1.9,
        )
        assert (f.video_step.reg, f.video_step.lam_tv, f.video_step.gamma) == ("tv_t", r.video_step.lam_tv, math.inf)


@pytest.mark.parametrize(("name", "nfe_video", "nfe_image"), [("A", 5, 4), ("B", 5, 4), ("C", 3, 2), ("A_fast", 5, 4)])
def test_preset_schedules_end_to_end(priors9, name, nfe_video, nfe_image):
    """Each released schedule on a 9-frame 32x32 clip with its operator: the documented NFE in both conventions
    (§6.4-6.5: A/B 5 + 4 = 9, C 3 + 2 = 5; T network evaluations per image sweep), the batched calls made
    (video: one per row; image: ceil(BT / frame_batch) per sweep), and x_N = the last data step applied to the last
    raw video output, which it brings closer to the data."""
    vp, ip = priors9
    B, T, fb = 1, 9, 4
    op = _problem(name, T)
    y = measure(op, video((B, 3, T, 32, 32), 0), SIGMA_Y, torch.Generator().manual_seed(1))
    seen = []
    x, info = lvtino(vp, ip, op, y, schedule=name, sigma_y=SIGMA_Y, frame_batch=fb, generator=gens(2),
                     callback=seen.append, return_info=True)  # fmt: skip
    assert x.shape == (B, 3, T, 32, 32) and torch.isfinite(x).all()
    assert (info["nfe"], info["nfe_video"], info["nfe_image"]) == (nfe_video + nfe_image, nfe_video, nfe_image)
    assert (info["calls"], info["calls_image"]) == (nfe_video + nfe_image * T, nfe_image * T)
    assert info["forward_passes"] == {"video": nfe_video, "image": nfe_image * math.ceil(B * T / fb)}
    assert len(seen) == nfe_video and [d["x_image"] is None for d in seen] == [False] * nfe_image + [True]
    last = seen[-1]
    assert torch.equal(last["x"], x) and torch.equal(last["x_video"], info["x_video"])
    rows = LVTINO_SCHEDULES[name]
    sigma_n = torch.full((B,), sigma_internal(SIGMA_Y))
    torch.testing.assert_close(x, data_step(op, info["x_video"], y, rows[-1].video_step, sigma_n), rtol=0, atol=1e-6)
    assert (op.A(x) - y).norm() < 0.5 * (op.A(info["x_video"]) - y).norm()
    if name != "B":  # PDHG and Adam clamp (§6.3); B's prox output is returned as is
        assert x.abs().max() <= 1


@pytest.mark.parametrize("noiseless", [False, True])
def test_last_data_step_is_optimal(priors5_64, noiseless):
    """float64, generic schedule (§6.4 last paragraph), circular temporal blur + SR x2 (closed-form prox): x_N =
    prox_{gamma g}(x~) with gamma = eta delta_N / sigma_n^2 and x~ the last raw video output, i.e.
    (x - x~) + gamma A^T(Ax - y) = 0 (§6.3); with sigma_y = 0, gamma = inf and x_N lies on {Ax = y}."""
    vp, ip = priors5_64
    op = Compose(PerFrame(SuperResolution(2, "bicubic", padding="circular")), TemporalBlur(3)).double()
    op.cg_rtol, op.cg_max_iter = 1e-13, 2000  # the projection (sigma_y = 0) has no closed form: CG in y-space
    sigma_y = 0.0 if noiseless else 0.01
    y = measure(op, video((2, 3, 5, 16, 16), 0).double(), sigma_y, torch.Generator().manual_seed(1)).double()
    schedule = generic_schedule([0.5, 0.2, 0.1], t_video=(600, 400, 200), t_image=(300, 150))
    x, info = lvtino(vp, ip, op, y, schedule=schedule, sigma_y=sigma_y, generator=gens(5, 6), return_info=True)
    assert x.dtype == DT and info["nfe"] == 5
    if noiseless:
        assert (op.A(x) - y).flatten(1).norm(dim=1).max() <= 1e-10 * y.norm()
        return
    x_tilde, gamma = info["x_video"], 0.25 * 0.1 / sigma_internal(sigma_y) ** 2
    grad = (x - x_tilde) + gamma * op.A_adjoint(op.A(x) - y)
    assert grad.flatten(1).norm(dim=1).max() <= 1e-10 * (x - x_tilde).flatten(1).norm(dim=1).min()


def test_wan_video_prior_with_prompts():
    """The Wan contract (§3.2c: latent video, T = 4k + 1, text condition from a prompt string): two rows run with
    one video call per row and one image sweep; a clip of 6 frames is refused before any call."""
    from ud2m.priors.tiny_video import tiny_video_flow_prior
    from ud2m.solvers.lvtino import VIDEO_PROMPT

    vp, ip = tiny_video_flow_prior(), tiny_pixel_prior(seed=4)
    op = PerFrame(SuperResolution(2, "bicubic", padding="circular"))
    y = measure(op, video((2, 3, 5, 16, 16), 0), 0.01, torch.Generator().manual_seed(1))
    schedule = generic_schedule(0.2, t_video=(757, 375), t_image=(249,))
    x, info = lvtino(vp, ip, op, y, schedule=schedule, sigma_y=0.01, cond_video=VIDEO_PROMPT, generator=gens(1, 2),
                     return_info=True)  # fmt: skip
    assert x.shape == (2, 3, 5, 16, 16) and torch.isfinite(x).all()
    assert info["forward_passes"] == {"video": 2, "image": 2} and (info["nfe"], info["calls"]) == (3, 2 + 5)
    y6 = op.A(video((1, 3, 6, 16, 16), 0))
    with pytest.raises(ValueError, match=r"T = 4k \+ 1 frames.*got T = 6"):
        lvtino(vp, ip, op, y6, schedule=schedule, sigma_y=0.01, cond_video=VIDEO_PROMPT)
    assert info["forward_passes"]["video"] == vp.nfe == 2  # the refused clip made no call


# ---------------------------------------------------------------------------------------------- batching (§1.5)
def test_framewise_fallback_equals_latino_on_each_video(priors5_64):
    """video_prior=None is LATINO with the image prior on every frame: for a frame-wise operator it equals `latino`
    run on each video's T frames with that video's generator (schedule B's image times and step-4 gammas)."""
    _, ip = priors5_64
    sr = SuperResolution(2, "bicubic", padding="circular").double()
    op = PerFrame(sr)
    B, T = 2, 5
    y = measure(op, video((B, 3, T, 16, 16), 0).double(), 0.01, torch.Generator().manual_seed(1)).double()
    x, info = lvtino(None, ip, op, y, schedule="B", sigma_y=0.01, frame_batch=3, generator=gens(7, 8),
                     return_info=True)  # fmt: skip
    gammas = [16868.0, 16868.0, 2721.0, 2721.0]  # §6.4, problem B, step 4

    def rule(k, t, u, *args):
        return torch.full((u.shape[0],), gammas[k - 1], dtype=u.dtype)

    for b, seed in enumerate((7, 8)):
        y_frames = y[b].transpose(0, 1)  # (T, 3, h, w)
        expected = latino(ip, sr, y_frames, timesteps=T_IMAGE_AB, weights=rule, sigma_y=0.01,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
        torch.testing.assert_close(x[b].transpose(0, 1), expected, rtol=0, atol=1e-12)
    assert (info["nfe"], info["nfe_video"], info["calls"]) == (4, 0, 4 * T)
    assert info["forward_passes"]["image"] == 4 * math.ceil(B * T / 3)
    with pytest.raises(ValueError, match="per frame"):
        lvtino(None, ip, op, y, schedule="B", sigma_y=0.01, shared_image_noise=True)


def test_per_video_independence(priors5):
    """Video i's result depends only on its data and generator i, not on the batch (PDHG step rule included)."""
    vp, ip = priors5
    op = lvtino_problem_a(5)
    y = measure(op, video((2, 3, 5, 16, 16), 0), 0.01, torch.Generator().manual_seed(1))
    schedule = generic_schedule(0.2, t_video=(600, 300), t_image=(200,), lam_tv=1e-3, pdhg_iters=20)
    run = dict(schedule=schedule, sigma_y=0.01, frame_batch=4)
    full = lvtino(vp, ip, op, y, generator=gens(11, 12), **run)
    swapped = lvtino(vp, ip, op, y[[1, 0]], generator=gens(12, 11), **run)
    alone = lvtino(vp, ip, op, y[1:], generator=gens(12), **run)
    torch.testing.assert_close(swapped, full[[1, 0]], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], full[1], rtol=0, atol=1e-5)
    assert (full[0] - full[1]).abs().max() > 1e-2  # different data and noise give different videos


@pytest.mark.parametrize("shared", [True, False])
def test_image_noise_shared_by_frames(priors5, shared, monkeypatch):
    """Step 3 (§6.2, §6.5): the image prior sees z = a E(x_half) + b eps; eps = (z - a x_half)/b is the same for all
    frames of a video with shared noise [ref] and differs between videos; without, it differs between frames."""
    vp, ip = priors5
    op = PerFrame(SuperResolution(2, "bicubic", padding="circular"))
    y = measure(op, video((2, 3, 5, 16, 16), 0), 0.01, torch.Generator().manual_seed(1))
    inputs, halves = [], []
    original = ip.predict_x0
    monkeypatch.setattr(ip, "predict_x0", lambda z, t, c=None: inputs.append((z, t)) or original(z, t, c))
    schedule = generic_schedule(0.2, t_video=(600, 300), t_image=(200,))
    lvtino(vp, ip, op, y, schedule=schedule, sigma_y=0.01, frame_batch=20, generator=gens(1, 2),
           shared_image_noise=shared, callback=lambda d: halves.append(d["x_half"]))  # fmt: skip
    (z, t), x_half = inputs[0], halves[0].clamp(-1, 1)
    a, b = ip.scales(t)
    eps = (z - a[:, None, None, None] * x_half.transpose(1, 2).flatten(0, 1)) / b[:, None, None, None]
    eps = eps.reshape(2, 5, 3, 16, 16)
    spread = (eps - eps[:, :1]).abs().amax(dim=(2, 3, 4))  # (B, T): distance to frame 0 of the same video
    assert spread.max() < 1e-3 if shared else spread[:, 1:].min() > 0.5
    assert (eps[0, 0] - eps[1, 0]).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------- pieces
def test_adam_data_step_first_step_and_gradient():
    """The Adam data step (§6.3) takes torch's first Adam step on the smoothed-TV3 objective: u1 = clamp(x~ - lr
    g/(|g| + 1e-8)), g = its autograd gradient at x~ (m^ = g, v^ = g^2 after bias correction)."""
    op = lvtino_problem_c(9, padding="circular").double()
    x_tilde = 0.5 * video((2, 3, 9, 32, 32), 0).double()
    y = op.A(video(x_tilde.shape, 1).double())
    lam, gamma, alpha, eps_tv, lr = 0.03, 7.0, 2.0, 0.05, 0.01

    def objective(u):
        du = forward_diff(u, reg_weights("tv3", 5, alpha))
        tv = (du.square().sum(1) + eps_tv**2).sqrt().sum()
        return 0.5 * (op.A(u) - y).square().sum() + lam * tv + (u - x_tilde).square().sum() / (2 * gamma)

    u = x_tilde.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(u), u)
    expected = (x_tilde - lr * g / (g.abs() + 1e-8)).clamp(-1, 1)
    kw = dict(lam_tv=lam, gamma=gamma, alpha=alpha, eps_tv=eps_tv, lr=lr)
    torch.testing.assert_close(data_step_adam(op, x_tilde, y, iters=1, **kw), expected, rtol=0, atol=1e-12)
    many = data_step_adam(op, x_tilde, y, iters=60, **kw)
    assert objective(many) < objective(x_tilde) and many.abs().max() <= 1


def test_schedules_and_validation():
    """§6.4 tables (A/B share times; B's implied eta ~ 0.17 then ~ 0.33), the generic eta split, and clear errors."""
    a, b, c = (LVTINO_SCHEDULES[k] for k in "ABC")
    assert [r.t_video for r in a] == [r.t_video for r in b] == [757, 522, 375, 255, 125]
    assert [r.t_image for r in c] == [249, 63, None]
    etas = [r.video_step.gamma / (r.video_step.gamma + r.image_step.gamma) for r in b[:-1]]
    assert [round(e, 2) for e in etas] == [0.17, 0.17, 0.33, 0.33]
    sigma_n = torch.tensor([0.02, 0.1])
    for row in generic_schedule([1.0, 2.0, 3.0], t_video=(700, 500, 300), t_image=(400, 200), eta=0.3)[:-1]:
        gv, gi = row.video_step.gammas(sigma_n), row.image_step.gammas(sigma_n)
        torch.testing.assert_close(gv / (gv + gi), torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="eta must lie in"):
        generic_schedule(1.0, eta=1.0)
    with pytest.raises(ValueError, match="expected 5 deltas"):
        generic_schedule([1.0, 2.0])
    with pytest.raises(ValueError, match="likelihood only"):
        LVTINOStep(500, DataStep(), 300, DataStep("pdhg", reg="tv3", iters=3))
    with pytest.raises(ValueError, match="method must be one of"):
        DataStep("lbfgs")
    with pytest.raises(ValueError, match="projection"):
        DataStep("project_cg", gamma=3.0, iters=2)
    with pytest.raises(ValueError, match=r"rows \[1\] of 2"):  # the last row must not have an image step
        lvtino(None, None, None, None, schedule=[a[0], a[1]], sigma_y=0.0)
    with pytest.raises(ValueError, match=r"rows \[0\] of 2"):  # every other row needs one
        lvtino(None, None, None, None, schedule=[dataclasses.replace(a[0], t_image=None, image_step=None), a[-1]],
               sigma_y=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="unknown schedule 'D'"):
        lvtino(None, None, None, None, schedule="D", sigma_y=0.0)
    with pytest.raises(ValueError, match="schedule is required"):
        lvtino(None, None, None, None, sigma_y=0.0)


def test_shape_errors_before_any_network_call(priors5):
    """A clip length or frame size the video prior cannot take is refused before the first NFE (§6.2)."""
    vp, ip = priors5
    vp.reset_nfe(), ip.reset_nfe()
    op = PerFrame(Denoising())
    for shape, message in (((1, 3, 9, 16, 16), r"T = 5 frames.*got T = 9"), ((1, 3, 5, 17, 16), "multiples of 2")):
        y = op.A(video(shape, 0))
        with pytest.raises(ValueError, match=message):
            lvtino(vp, ip, op, y, schedule="B", sigma_y=SIGMA_Y)
    assert vp.nfe == 0 and ip.nfe == 0
