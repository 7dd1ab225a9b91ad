"""Self-tuning: measurement splitting, deviance, discrepancy principle, SURE, batched search (small, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon import tuning
from napari_diffrecon.io import Measurement
from napari_diffrecon.physics import build_likelihood, build_operator
from napari_diffrecon.priors.prior import GaussianPrior
from napari_diffrecon.reconstruct import RunSettings, reconstruct
from napari_diffrecon.samplers import SamplerParams

GRID = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # timing-sensitive batched runs


def _ct_problem(n=32, views=24, rel_noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (n, n)).astype(np.float32)
    yy, xx = np.mgrid[:n, :n]
    x *= ((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2) < (n / 2) ** 2
    spec = {"modality": "ct", "image_shape": [n, n], "angles_deg": np.linspace(0, 180, views, endpoint=False)}
    clean = build_operator(spec).forward(torch.from_numpy(x)).numpy()
    sig = float(rel_noise * np.abs(clean).mean())
    y = (clean + rng.normal(0, sig, clean.shape)).astype(np.float32)
    return Measurement(y, spec, {"model": "gaussian", "sigma": sig}, ground_truth=x)


def _inpaint_problem(n=32, sig=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (n, n)).astype(np.float32)
    mask = np.ones((n, n))
    mask[8:20, 8:20] = 0
    y = ((x + rng.normal(0, sig, (n, n))) * mask).astype(np.float32)
    spec = {"modality": "inpaint", "image_shape": [n, n], "mask": mask}
    return Measurement(y, spec, {"model": "gaussian", "sigma": sig}, ground_truth=x)


SETTINGS = RunSettings(method="dds", params=SamplerParams(n_steps=20, eta=0.85, cg_iters=5))


def _true_mse(meas, prior):
    out = []
    for g in GRID:
        r = reconstruct(meas, tuning.apply_tuning(SETTINGS, {"gamma": g}), prior=prior)
        out.append(float(((r.reconstruction - meas.ground_truth) ** 2).mean()))
    return np.array(out)


def test_split_ct_keeps_operator_rows():
    meas = _ct_problem(views=20)
    s = tuning.split_measurement(meas, 0.25, seed=3)
    full = np.asarray(meas.operator["angles_deg"])
    kept = np.asarray(s.train.operator["angles_deg"])
    held = s.operator.angles_deg
    assert len(kept) == 15 and len(held) == 5
    assert set(np.round(kept, 6)) | set(np.round(held, 6)) == set(np.round(full, 6))
    # the held-out sub-operator predicts exactly the held-out columns of the full sinogram
    x = torch.from_numpy(meas.ground_truth)
    col = [int(np.argmin(np.abs(full - a))) for a in held]
    ref = build_operator(meas.operator).forward(x)[:, col]
    assert torch.allclose(s.operator.forward(x), ref, atol=1e-5)
    assert s.train.data.shape == (32, 15) and tuple(s.data.shape) == (32, 5)


def test_split_pet_restricts_attenuation_and_background():
    n, views = 16, 10
    att = np.random.default_rng(0).uniform(0.5, 1, (n, views))
    bg = np.random.default_rng(1).uniform(0.1, 1, (n, views))
    spec = {"modality": "pet", "image_shape": [n, n], "angles_deg": np.arange(views) * 18.0, "attenuation": att}
    meas = Measurement(np.ones((n, views), np.float32), spec, {"model": "poisson", "background": bg})
    s = tuning.split_measurement(meas, 0.3, seed=0)
    held = [int(round(a / 18)) for a in s.operator.angles_deg]
    np.testing.assert_allclose(s.operator.attenuation.numpy(), att[:, held], rtol=1e-6)
    np.testing.assert_allclose(s.likelihood.background.numpy(), bg[:, held], rtol=1e-6)
    assert s.train.build_operator().n_angles == views - len(held)


def test_split_mri_holds_out_lines_outside_calibration():
    n = 32
    cols = np.zeros(n, bool)
    cols[14:19] = True  # calibration region
    cols[[2, 5, 8, 11, 22, 25, 28, 30]] = True
    mask = np.broadcast_to(cols[None], (n, n)).astype(np.float32)
    data = (np.random.default_rng(0).normal(size=(n, n)) * mask).astype(np.complex64)
    meas = Measurement(data, {"modality": "mri", "image_shape": [n, n], "mask": mask}, {"model": "gaussian"})
    s = tuning.split_measurement(meas, 0.25, seed=0)
    ho = s.operator.mask.numpy().any(0)
    tr = np.asarray(s.train.operator["mask"]).any(0)
    assert ho.sum() == 2 and not (ho & tr).any() and ((ho | tr) == cols).all()
    assert not ho[14:19].any()
    assert np.abs(s.train.data[:, ho]).max() == 0


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        tuning.split_measurement(_ct_problem(), 0.9)


def test_deviance_is_one_at_the_truth_gaussian_and_small_poisson():
    meas = _ct_problem(views=30, rel_noise=0.05)
    op, lik = meas.build_operator(), meas.build_likelihood()
    d = tuning.holdout_deviance(op, torch.from_numpy(meas.ground_truth)[None], meas.to_tensor(), lik)
    assert 0.8 < float(d[0]) < 1.2
    # Poisson: deviance per datum ≈ 1 at the truth for moderate counts, much larger for a wrong image
    rng = np.random.default_rng(0)
    x = np.abs(meas.ground_truth) * 20
    spec = {"modality": "pet", "image_shape": [32, 32], "angles_deg": np.linspace(0, 180, 30, endpoint=False)}
    pop = build_operator(spec)
    m = rng.poisson(pop.forward(torch.from_numpy(x)).numpy() + 1.0).astype(np.float32)
    plik = build_likelihood({"model": "poisson", "background": 1.0})
    d_true = float(tuning.holdout_deviance(pop, torch.from_numpy(x)[None], torch.from_numpy(m), plik)[0])
    d_flat = float(tuning.holdout_deviance(pop, torch.full((1, 32, 32), float(x.mean())), torch.from_numpy(m), plik)[0])
    assert 0.5 < d_true < 1.5 and d_flat > 3 * d_true


def test_split_picks_a_data_weight_near_the_true_optimum():
    meas, prior = _ct_problem(), GaussianPrior(0.5)
    mse = _true_mse(meas, prior)
    res = tuning.auto_tune(meas, SETTINGS, prior=prior, params={"gamma": GRID}, criterion="split")
    chosen = GRID.index(res.best["gamma"])
    assert mse[chosen] <= 1.05 * mse.min()
    assert mse[chosen] < 0.9 * mse.max()  # the search matters on this problem
    assert len(res.scores) == len(GRID) and res.details["batched"]


def test_discrepancy_principle_recovers_the_noise_level():
    meas, prior = _inpaint_problem(), GaussianPrior(0.5)
    res = tuning.auto_tune(meas, SETTINGS, prior=prior, params={"gamma": GRID}, criterion="discrepancy")
    r = reconstruct(meas, tuning.apply_tuning(SETTINGS, res.best), prior=prior)
    op = meas.build_operator()
    resid = op.forward(torch.from_numpy(r.reconstruction)) - meas.to_tensor()
    sigma_hat = float(resid.pow(2).sum() / op.mask.sum()) ** 0.5
    assert abs(sigma_hat / 0.5 - 1) < 0.3
    mse = _true_mse(meas, prior)
    assert mse[GRID.index(res.best["gamma"])] <= 1.1 * mse.min()


def test_sure_picks_near_optimal_weight():
    meas, prior = _inpaint_problem(), GaussianPrior(0.5)
    res = tuning.auto_tune(meas, SETTINGS, prior=prior, params={"gamma": GRID}, criterion="sure")
    mse = _true_mse(meas, prior)
    assert mse[GRID.index(res.best["gamma"])] <= 1.05 * mse.min()
    with pytest.raises(ValueError, match="Gaussian"):
        tuning.auto_tune(
            Measurement(np.ones((32, 32), np.float32), {"modality": "denoise", "image_shape": [32, 32]},
                        {"model": "poisson"}),
            SETTINGS, prior=prior, params={"gamma": [1.0]}, criterion="sure",
        )


def test_batched_search_equals_sequential_and_2d_grid():
    meas, prior = _ct_problem(n=24, views=16), GaussianPrior(0.5)
    grid = {"gamma": [0.3, 3.0], "cg_iters": [2, 5]}
    settings = RunSettings(method="dds", params=SamplerParams(n_steps=8, cg_iters=5), seed=1)
    a = tuning.auto_tune(meas, settings, prior=prior, params=grid, batched=True, criterion="split")
    b = tuning.auto_tune(meas, settings, prior=prior, params=grid, batched=False, criterion="split")
    assert len(a.grid) == 4 and a.grid[1] == {"gamma": 0.3, "cg_iters": 5}
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3)
    assert a.best == b.best
    assert "gamma" in a.curve_text() and a.to_dict()["criterion"] == "split"


def test_bad_requests_are_refused_clearly():
    meas, prior = _ct_problem(n=24, views=16), GaussianPrior(0.5)
    with pytest.raises(ValueError, match="gradients"):
        tuning.auto_tune(meas, RunSettings(method="dps"), prior=prior, params="zeta", batched=True)
    with pytest.raises(ValueError, match="cannot tune"):
        tuning.auto_tune(meas, SETTINGS, prior=prior, params="n_steps")
    with pytest.raises(ValueError, match="diffusion samplers"):
        tuning.auto_tune(meas, RunSettings(method="fbp"), prior=prior)


def test_tuned_reconstruct_records_the_search_and_progress_and_cancel():
    import threading

    meas, prior = _ct_problem(n=24, views=16), GaussianPrior(0.5)
    seen = []
    settings = RunSettings(method="dds", params=SamplerParams(n_steps=6, cg_iters=3), n_samples=2)
    result, res = tuning.tuned_reconstruct(meas, settings, prior=prior, params={"gamma": [0.3, 3.0]},
                                           progress=lambda d, t, msg: seen.append((d, t)))
    assert result.provenance["auto_tune"]["best"] == res.best
    assert result.provenance["settings"]["params"]["gamma"] == res.best["gamma"]
    assert result.provenance["settings"]["n_samples"] == 2  # the final run keeps the requested samples
    assert seen[-1] == (2, 2) and all(0 <= d <= t for d, t in seen)
    stop = threading.Event()
    stop.set()
    with pytest.raises(tuning.TuneCancelledError):
        tuning.auto_tune(meas, settings, prior=prior, params={"gamma": [0.3, 3.0]}, cancel=stop)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_batched_search_runs_the_network_in_the_runs_precision(precision):
    """The batched search wraps the prior in a BatchedPrior; the run's precision must reach the wrapped network, not
    stay on the wrapper (a cached prior left at another precision by an earlier run would otherwise be used as is)."""
    from napari_diffrecon.priors import ModelCard, NetworkPrior
    from napari_diffrecon.priors.network import build_network

    torch.manual_seed(0)
    card = ModelCard(name="tiny-tune", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    prior = NetworkPrior(build_network({**card.architecture, "channels": 1}), card)
    prior.precision = "float16" if precision == "float32" else "float32"  # left behind by an earlier run
    seen = []
    call = prior._call_network
    prior._call_network = lambda x, label: seen.append(prior.precision) or call(x, label)
    settings = RunSettings(method="dds", params=SamplerParams(n_steps=3, cg_iters=2), seed=1, precision=precision)
    res = tuning.auto_tune(_ct_problem(n=32, views=16), settings, prior=prior, params={"gamma": [0.3, 3.0]},
                           batched=True)
    assert res.details["batched"] and seen and set(seen) == {precision}
    bp = tuning.BatchedPrior(prior, 1)
    bp.precision = "bfloat16"
    assert prior.precision == "bfloat16" == bp.precision


def test_the_default_zeta_grid_follows_a_run_value_outside_it():
    """DPS's tuned ζ is 6 on CT and 40 on PET, beyond the default 0.1–3: the search is moved to the run's scale."""
    from napari_diffrecon.samplers import SamplerParams

    def values(zeta):
        return [g["zeta"] for g in tuning._grid(None, "dps", SamplerParams(zeta=zeta))]

    assert values(1.0) == values(0.5) == tuning.DEFAULT_GRIDS["zeta"]  # inside: the grid as it is
    assert values(40.0) == [4.0, 12.0, 40.0, 120.0]
    assert values(6.0) == [0.6, 1.8, 6.0, 18.0]
    assert [g["gamma"] for g in tuning._grid(None, "dds", SamplerParams(gamma=30.0))] == tuning.DEFAULT_GRIDS["gamma"]


def test_the_shared_batch_is_ordered_by_run_not_by_thread():
    """Runs join the batched denoiser call in grid order whatever order their threads arrive in (the float rounding
    of a batched call depends on an image's place, so the order must not change between searches)."""
    import threading
    import time

    class Recorder:
        def __init__(self):
            self.batches = []

        def denoise(self, x, sigma):
            self.batches.append(x[:, 0].tolist())
            return x

    rec = Recorder()
    bp = tuning.BatchedPrior(rec, 2)
    out = {}

    def run(i, delay):
        bp.bind(i)
        time.sleep(delay)
        out[i] = bp.denoise(torch.full((1, 1), float(i)), 1.0)
        bp.leave()

    threads = [threading.Thread(target=run, args=(1, 0.0)), threading.Thread(target=run, args=(0, 0.2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.batches == [[0.0, 1.0]] and float(out[0]) == 0.0 and float(out[1]) == 1.0


def test_auto_criterion_is_the_discrepancy_principle_for_known_gaussian_noise_else_splitting():
    """Measured with DDS on three noise draws of each benchmark task (README "Self-tuning"): splitting lost up to
    3.9 dB on MRI (its held-out lines are mostly noise), the discrepancy principle at most 0.66."""
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.io.bundle import default_noise

    ct = load_sample("ct_sparse23")
    assert tuning.choose_criterion(ct)[0] == "discrepancy"
    assert tuning.choose_criterion(load_sample("pet_lowcount"))[0] == "split"  # counts
    ct.noise = default_noise(ct.data)  # a reader's assumed σ
    assert tuning.choose_criterion(ct)[0] == "split"
    meas, prior = _ct_problem(n=24, views=16), GaussianPrior(0.5)
    res = tuning.auto_tune(meas, SETTINGS, prior=prior, params={"gamma": [0.3, 3.0]})
    assert res.criterion == tuning.choose_criterion(meas)[0]
    assert res.to_dict()["criterion_chosen"].startswith("auto: ")


def test_apply_tuning_asks_for_resolved_settings():
    with pytest.raises(ValueError, match="resolve_settings"):
        tuning.apply_tuning(RunSettings(method="dds"), {"gamma": 2.0})


def test_a_flat_split_curve_says_the_data_hardly_decide():
    flat = tuning.TuneResult(best={"gamma": 3.0}, grid=[{"gamma": g} for g in (0.1, 1.0, 3.0, 10.0)],
                             scores=[1.1059, 1.1057, 1.1054, 1.1059], criterion="split", method="dds")
    assert "hardly decide" in flat.edge_note() and "hardly decide" in flat.curve_text()
    steep = tuning.TuneResult(best={"gamma": 3.0}, grid=flat.grid, scores=[1.5, 1.2, 1.0, 1.3], criterion="split",
                              method="dds")
    assert steep.edge_note() is None
