"""GPU checks: the conditional 2D samplers, likelihoods and training on a CUDA device (skipped without one).

Not covered here: the consistency, unconditional and volume (z-TV) samplers.

CI has no GPU; these run on a lent GPU machine (``python -m pytest tests/test_cuda.py``). Each sampler run on the
GPU must be deterministic under its seed on that device, reach the quality the same run reaches on the CPU (the
random streams differ between devices, so within sampling spread, not bit for bit), and beat its classical start.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.metrics import psnr
from napari_diffrecon.reconstruct import RunSettings, reconstruct
from napari_diffrecon.samplers.defaults import recommended_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZE = 64


def _real_slices() -> tuple[np.ndarray, float, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    return hu, float(ds.PixelSpacing[0]) * hu.shape[0] / SIZE, mr


@pytest.fixture(scope="module")
def tasks():
    from napari_diffrecon.simulate import activity_from_anatomy, simulate_from_image

    hu, px, mr = _real_slices()
    return {
        "ct": simulate_from_image(hu, "ct", size=SIZE, views=12, units="HU", pixel_size_mm=px, seed=0),
        "ct-lowdose": simulate_from_image(hu, "ct", size=SIZE, views=60, photons=1e4, units="HU",
                                          pixel_size_mm=px, seed=0),
        "mri-8c": simulate_from_image(mr, "mri", size=SIZE, accel=4.0, coils=8, seed=0),
        "pet": simulate_from_image(activity_from_anatomy(mr, "mr"), "pet", size=SIZE, views=60, counts=1e5, seed=0),
    }


@pytest.fixture(scope="module")
def priors():
    from napari_diffrecon.priors import load_prior

    names = {"ct": "ct-phantom-128", "mri": "mri-brain-128", "pet": "pet-phantom-128"}
    return {k: load_prior(v) for k, v in names.items()}


CASES = [  # (task, method, hot start): each conditional 2D sampler, and each modality's data step
    ("ct", "dds", "fbp"), ("ct", "dps", "fbp"), ("ct", "mcg", None), ("ct", "song", None),
    ("ct-lowdose", "dds", "fbp"), ("mri-8c", "dds", "cg"), ("mri-8c", "dps", "cg"), ("pet", "dds", "mlem"),
]


@pytest.mark.parametrize("task,method,hot", CASES)
def test_sampler_on_cuda_is_deterministic_and_as_good_as_on_cpu(tasks, priors, task, method, hot):
    m = tasks[task]
    modality = task.split("-")[0]
    params = recommended_params(method, modality, hot_start=hot is not None)
    params.n_steps = min(params.n_steps, 20)

    def run(device: str, n: int = 1):
        s = RunSettings(method=method, params=params, hot_start=hot, n_samples=n, seed=3, device=device)
        return reconstruct(m, s, prior=priors[modality])

    gt = m.ground_truth
    a, b, cpu = run("cuda"), run("cuda"), run("cpu")
    if method in ("dps", "mcg"):  # backprop through the network: CUDA's upsampling backward adds atomically
        np.testing.assert_allclose(a.reconstruction, b.reconstruction, rtol=0,
                                   atol=1e-4 * float(np.abs(b.reconstruction).max()))
    else:  # same seed, same device: the same result, bit for bit
        np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    assert np.isfinite(a.reconstruction).all() and a.provenance["settings"]["device"] == "cuda"
    p_gpu, p_cpu = psnr(np.abs(a.reconstruction), np.abs(gt)), psnr(np.abs(cpu.reconstruction), np.abs(gt))
    assert abs(p_gpu - p_cpu) < 1.0, (p_gpu, p_cpu)
    start = reconstruct(m, RunSettings(method=hot or {"ct": "fbp", "mri": "cg", "pet": "mlem"}[modality]))
    assert p_gpu > psnr(np.abs(start.reconstruction), np.abs(gt)), "the sampler must improve on its classical start"


def test_posterior_batch_on_cuda_gives_distinct_samples_and_a_std(tasks, priors):
    m = tasks["ct"]
    params = recommended_params("dds", "ct", hot_start=True)
    r = reconstruct(m, RunSettings(method="dds", params=params, hot_start="fbp", n_samples=4, seed=0,
                                   device="cuda", keep_samples=True), prior=priors["ct"])
    assert r.samples.shape[0] == 4 and not np.allclose(r.samples[0], r.samples[1])
    assert r.std is not None and np.isfinite(r.std).all() and r.std.mean() > 0


def test_likelihood_gradients_on_cuda_match_cpu(tasks):
    for name in ("ct-lowdose", "pet", "mri-8c"):
        m = tasks[name]
        x = torch.rand((2, *m.build_operator().image_shape), generator=torch.Generator().manual_seed(1)) * 0.1
        if m.build_operator().is_complex:
            x = torch.complex(x, 0.5 * x)
        out = []
        for dev in ("cpu", "cuda"):
            op, lik, y = m.build_operator(dev), m.build_likelihood(dev), m.to_tensor().to(dev)
            xd = x.to(dev).requires_grad_(True)
            nll = lik.nll(op, xd, y)
            (g,) = torch.autograd.grad(nll.sum(), xd)
            out.append((nll.detach().cpu(), g.cpu()))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-3, atol=1e-4 * float(out[0][1].abs().max()))


def test_training_on_cuda_with_amp_writes_a_prior(tmp_path):
    from napari_diffrecon.cli import main
    from napari_diffrecon.priors import load_prior

    out = tmp_path / "run"
    assert main(["train", "builtin:ct-phantoms", "--modality", "ct", "--name", "gpu-check", "--arch", "tiny",
                 "--resolution", "32", "--patch", "32", "--batch", "8", "--steps", "20", "--val-every", "10",
                 "--amp", "--device", "cuda", "--no-progress", "-o", str(out)]) == 0
    prior = load_prior(out / "gpu-check.json")
    assert prior.card.training["device"].startswith("cuda")
    assert np.isfinite(prior.card.training["final_val_loss"])
