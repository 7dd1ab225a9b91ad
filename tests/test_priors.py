"""Priors: schedules, model cards, save/load, denoiser limits, a tiny training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_diffrecon.priors import (
    CardError,
    EDMSchedule,
    GaussianPrior,
    ModelCard,
    NetworkPrior,
    VESchedule,
    VPSchedule,
    get_schedule,
    load_prior_file,
    save_prior,
)
from napari_diffrecon.priors.network import build_network
from napari_diffrecon.priors.schedules import alpha_bar_to_sigma, sigma_to_alpha_bar
from napari_diffrecon.priors.training import ImagePool, TrainConfig, train_prior


def _card(**kw) -> ModelCard:
    d = dict(
        name="t",
        modality="ct",
        channels=1,
        resolution=32,
        architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"},
    )
    d.update(kw)
    return ModelCard(**d)


def _tiny_prior(parametrisation="edm", schedule=None, seed=0) -> NetworkPrior:
    torch.manual_seed(seed)
    card = _card(parametrisation=parametrisation, schedule=schedule or {"name": "edm"})
    return NetworkPrior(build_network({**card.architecture, "channels": 1}), card)


def test_edm_sigmas_follow_karras_formula():
    s = EDMSchedule().sigmas(18)
    assert len(s) == 19 and s[-1] == 0
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002)
    assert torch.all(s[:-1][1:] < s[:-1][:-1])
    # ρ = 7: the 7th root of σ is linear in the step index.
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(17), atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_vp_schedules_map_to_sigma_consistently(kind):
    sch = VPSchedule(kind=kind)
    ab = sch.alpha_bars()
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < ab[0] < 1
    torch.testing.assert_close(sigma_to_alpha_bar(alpha_bar_to_sigma(ab)), ab)
    s = sch.sigmas(50)
    assert torch.all(s[:-1][1:] < s[:-1][:-1]) and s[-1] == 0
    train = sch.sample_training_sigma(1000, torch.Generator().manual_seed(0))
    assert train.min() >= s[-2] * 0.99 and train.max() <= s[0] * 1.01


def test_ve_and_named_schedules():
    s = VESchedule(sigma_min=0.01, sigma_max_=50).sigmas(10)
    ratios = s[1:-1] / s[:-2]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    assert isinstance(get_schedule("vp-cosine"), VPSchedule) and get_schedule("vp-cosine").kind == "cosine"
    assert get_schedule(EDMSchedule().to_dict()).rho == 7
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("ddim-magic")


def test_gaussian_prior_denoiser_is_exact_posterior_mean():
    p = GaussianPrior(sigma_p=2.0, mean=0.5)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 + 2.0 * torch.randn(20000, 1, 1, 1, generator=g)
    sigma = 1.5
    x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
    # E[x0 | x_t] estimated by least squares regression equals the closed form slope σp²/(σp²+σ²).
    slope = float(((x_t - 0.5) * (x0 - 0.5)).mean() / ((x_t - 0.5) ** 2).mean())
    assert slope == pytest.approx(4.0 / (4.0 + sigma**2), abs=0.02)
    torch.testing.assert_close(p.score(x_t, sigma), (p.denoise(x_t, sigma) - x_t) / sigma**2)


def test_gaussian_prior_closed_form_posterior():
    from napari_diffrecon.physics import CartesianMRI, Identity

    # Denoising: independent pixels, posterior N((σy² μp + σp² m)/(σp² + σy²), σp²σy²/(σp² + σy²)).
    p = GaussianPrior(sigma_p=2.0, mean=0.5)
    m = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    mean, cov = p.posterior(Identity((3, 4)), m, 1.0)
    torch.testing.assert_close(mean, (0.5 + 4.0 * m.flatten().double()) / 5.0)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64) * 0.8)
    # Fully sampled single-coil MRI (a unitary FFT): the same per real and imaginary part, in image space.
    op = CartesianMRI(np.ones((4, 4), np.float32))
    x = torch.complex(torch.randn(4, 4), torch.randn(4, 4))
    mean, cov = GaussianPrior(2.0).posterior(op, op.forward(x), 1.0)
    torch.testing.assert_close(mean, 0.8 * torch.cat([x.real.flatten(), x.imag.flatten()]).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(cov, torch.eye(32, dtype=torch.float64) * 0.8, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at most"):
        p.posterior(Identity((70, 70)), torch.zeros(70, 70), 1.0)


@pytest.mark.parametrize("parametrisation,schedule", [("edm", {"name": "edm"}), ("eps", {"name": "vp"})])
def test_network_denoiser_is_identity_at_small_sigma(parametrisation, schedule):
    p = _tiny_prior(parametrisation, schedule)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        d = p.denoise(x, 1e-4)
    assert (d - x).abs().max() < 1e-2


def test_save_load_round_trip_is_identical(tmp_path):
    p = _tiny_prior().to("cpu")  # the weight layout a loaded prior has on this device (channels-last on a CPU)
    w, c = save_prior(p, tmp_path / "myprior")
    assert w.suffix == ".safetensors" and c.suffix == ".json"
    q = load_prior_file(c)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(q.denoise(x, 0.3), p.denoise(x, 0.3), rtol=0, atol=0)
    assert q.card == p.card


def test_a_prior_on_a_cpu_stores_its_convolutions_channels_last_with_the_same_numbers():
    p = _tiny_prior()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = p.denoise(x, 0.3)
    p.to("cpu")
    weights = [m.weight for m in p.network.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)
    with torch.no_grad():
        torch.testing.assert_close(p.denoise(x, 0.3), before, rtol=1e-4, atol=1e-5)


def test_runs_that_move_one_prior_at_once_leave_its_weights_intact():
    """Runs sharing a prior (the batched tuning search, several workbench runs) each call ``prior.to(device)`` at
    their start. Two moves at once swapped a weight's storage while the other thread copied it: a third of such
    races left corrupted weights (the search then gave NaN). A prior already in place is not moved again."""
    import threading

    corrupted = 0
    for _ in range(20):
        p = _tiny_prior()
        ref = {k: v.clone() for k, v in p.network.state_dict().items()}
        barrier = threading.Barrier(4)

        def move(p=p, barrier=barrier):
            barrier.wait()
            p.to("cpu")

        threads = [threading.Thread(target=move) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        corrupted += any(not torch.equal(v, ref[k]) for k, v in p.network.state_dict().items())
    assert corrupted == 0
    storage = [w.data_ptr() for w in p.network.parameters()]
    p.to("cpu")  # already channels-last on the CPU: the same storage, nothing copied
    assert [w.data_ptr() for w in p.network.parameters()] == storage


def test_a_network_prior_pickles_for_dask_workers():
    """Dask's worker processes receive a prior object pickled: nothing in it (such as a lock) may refuse."""
    import pickle

    p = _tiny_prior()
    p.to("cpu")
    p.trace = True  # a traced graph (a TorchScript module) is left out of the pickle
    with torch.no_grad():
        p.denoise(torch.randn(1, 1, 32, 32), 0.5)
    assert p._traced is not None
    q = pickle.loads(pickle.dumps(p))
    assert q._traced is None
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(q.denoise(x, 0.3), p.denoise(x, 0.3), rtol=0, atol=0)
    q.to("cpu")  # the module-level move lock works on the copy too


def test_half_precision_weights_halve_the_file_and_barely_change_the_denoiser(tmp_path):
    p = _tiny_prior()
    w32, _ = save_prior(p, tmp_path / "f32")
    w16, c16 = save_prior(p, tmp_path / "f16", half=True)
    assert w16.stat().st_size < 0.6 * w32.stat().st_size
    q = load_prior_file(c16)
    assert next(q.network.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a, b = p.denoise(x, 0.3), q.denoise(x, 0.3)
    assert 0 < float((a - b).abs().max()) < 1e-2 * float(a.abs().max())


def test_loading_refuses_pickles_and_bad_cards(tmp_path):
    p = _tiny_prior()
    _, c = save_prior(p, tmp_path / "a")
    (tmp_path / "a.safetensors").write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    with pytest.raises(CardError, match="safetensors"):
        load_prior_file(c)
    save_prior(p, tmp_path / "b")
    d = json.loads((tmp_path / "b.json").read_text())
    d["channels"] = 3
    (tmp_path / "b.json").write_text(json.dumps(d))
    with pytest.raises(CardError, match="channels"):
        load_prior_file(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prior_file(tmp_path / "missing.json")
    with pytest.raises(CardError, match="unknown model card fields"):
        ModelCard.from_dict({**_card().__dict__, "pickle": "yes"})


def test_card_validation_lists_problems():
    with pytest.raises(CardError, match="modality") as e:
        _card(modality="xray", resolution=4).validate()
    assert "resolution" in str(e.value)
    _card().validate()


def test_tiny_training_lowers_loss_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    imgs = []
    for _ in range(16):  # blobs on a background: a structured data set
        cy, cx, r = rng.uniform(8, 24, 2).tolist() + [rng.uniform(3, 8)]
        imgs.append(np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, 0.8, -0.6))
    pool = ImagePool(torch.tensor(np.stack(imgs), dtype=torch.float32)[:, None])
    cfg = TrainConfig(
        name="tiny",
        arch="tiny",
        steps=60,
        batch_size=8,
        patch_size=32,
        resolution=32,
        val_every=20,
        ckpt_every=20,
        lr=1e-3,
        augment=False,
    )
    prior = train_prior(cfg, pool, tmp_path, resume=False, progress=False, log=lambda s: None)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert prior.card.training["steps"] == 60 and prior.card.training["final_val_loss"] > 0
    assert (tmp_path / "tiny.safetensors").exists() and (tmp_path / "checkpoint.pt").exists()
    # Resume: continuing to 80 steps starts from 60, not from scratch.
    logs = []
    cfg.steps = 80
    train_prior(cfg, pool, tmp_path, resume=True, progress=False, log=logs.append)
    assert any("resumed" in m and "step 60" in m for m in logs)
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 80


def test_train_cli_on_a_folder_and_bad_folders(tmp_path, capsys):
    from skimage.data import camera
    from skimage.io import imsave

    from napari_diffrecon.cli import main
    from napari_diffrecon.priors.data import load_training_images

    data = tmp_path / "imgs"
    data.mkdir()
    img = camera()
    for k in range(3):
        imsave(data / f"i{k}.png", np.roll(img, 40 * k, axis=1))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data),
                "--modality",
                "generic",
                "--name",
                "t",
                "--resolution",
                "32",
                "--patch",
                "32",
                "--arch",
                "tiny",
                "--batch",
                "4",
                "--steps",
                "4",
                "--val-every",
                "2",
                "--lr-schedule",
                "cosine",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    prior = load_prior_file(out / "t.json")
    assert prior.card.training["steps"] == 4 and prior.card.training["data"]["n_slices"] == 3
    assert prior.card.training["lr_schedule"] == "cosine"  # the card says how the rate went
    imgs = load_training_images(data, "generic", 32)
    assert imgs.shape == (3, 1, 32, 32) and -1.01 <= float(imgs.min()) and float(imgs.max()) <= 1.01
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "--modality", "ct", "-o", str(out)]) == 2
    assert "no images" in capsys.readouterr().err
    (data / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        load_training_images(data, "generic", 32)
    (data / "bad.npy").unlink()
    with pytest.raises(ValueError, match="Hounsfield"):
        load_training_images(empty.parent / "imgs", "ct", 32)


@pytest.mark.parametrize("parametrisation,schedule", [("edm", None), ("eps", {"name": "vp", "kind": "linear"})])
def test_traced_inference_equals_the_eager_network(parametrisation, schedule, monkeypatch):
    from napari_diffrecon.priors.lora import add_lora

    prior = _tiny_prior(parametrisation, schedule)
    assert prior.trace is None  # default: traced only off the main thread (checked at the end)
    prior.trace = True
    calls = []  # eager forward passes (a traced graph runs no Python); not a hook: hooks switch tracing off
    cls = type(prior.network)
    eager = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a: calls.append(1) or eager(self, *a))
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 32, 32), (3, 1, 32, 32), (2, 1, 48, 64)]:
        x = torch.randn(*shape, generator=gen)
        sigma = torch.rand(shape[0], generator=gen) + 0.05
        with torch.no_grad():
            prior.denoise(x, sigma)  # traces on the first call only
            n_before = len(calls)
            traced = prior.denoise(x, sigma)
            assert len(calls) == n_before  # the eager forward did not run: the traced graph did
            prior.trace = False
            ref = prior.denoise(x, sigma)
            prior.trace = True
        assert torch.equal(traced, ref), (traced - ref).abs().max()
    # with autograd (DPS, training) the eager network runs and the gradient reaches the input
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    n_before = len(calls)
    prior.denoise(x, 0.5).sum().backward()
    assert len(calls) == n_before + 1 and x.grad is not None and torch.isfinite(x.grad).all()
    x = torch.randn(2, 1, 32, 32, generator=gen)
    with torch.no_grad():
        # weights changed in place are seen by the traced graph (it shares them)
        before = prior.denoise(x, 0.3)
        for p in prior.network.parameters():
            p.mul_(1.01)
        after = prior.denoise(x, 0.3)
        prior.trace = False
        assert torch.equal(after, prior.denoise(x, 0.3)) and not torch.equal(before, after)
        prior.trace = True
        # LoRA layers (test-time adaptation) switch tracing off: a stale graph would ignore the adapters
        for layer in add_lora(prior.network, rank=2):
            torch.nn.init.normal_(layer.up.weight, std=0.1)
        prior.network.eval()
        n_before = len(calls)
        adapted = prior.denoise(x, 0.3)
        assert len(calls) == n_before + 1 and not torch.equal(adapted, after)
    # module hooks (benchmark timers, the volume memory probe) see every call: tracing is off while they exist
    plain = _tiny_prior(parametrisation, schedule)
    seen = []
    handle = plain.network.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        for _ in range(3):
            plain.denoise(x, 0.3)
    assert len(seen) == 3 and plain._traced is None
    handle.remove()
    # the default (trace None): eager in the main thread, traced in a worker thread, the same numbers
    import threading

    with torch.no_grad():
        main = plain.denoise(x, 0.3)
        assert plain._traced is None
        out = []

        def work() -> None:
            with torch.no_grad():  # grad mode is per thread
                out.append(plain.denoise(x, 0.3))

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    assert plain._traced is not None and torch.equal(out[0], main)


def test_reduced_precision_network_evaluation():
    """precision="bfloat16": the network runs under autocast, its output comes back float32, close to full precision;
    float32 is the network itself; the traced graph (traced under autocast) gives the eager autocast numbers."""
    from napari_diffrecon.priors.prior import check_precision

    prior = _tiny_prior("edm", None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 32, 32, generator=gen)
    sigma = torch.tensor([0.1, 0.5, 2.0])
    with torch.no_grad():
        full = prior.denoise(x, sigma)
        prior.precision = "bfloat16"
        prior.trace = False
        low = prior.denoise(x, sigma)
        prior.trace = True
        prior.denoise(x, sigma)  # traces
        traced = prior.denoise(x, sigma)
    assert low.dtype == torch.float32 and traced.dtype == torch.float32
    assert not torch.equal(low, full)  # the reduced type really ran
    rel = float((low - full).norm() / full.norm())
    assert rel < 2e-2, rel  # bfloat16 keeps 8 bits of mantissa: ~0.5 % in the output
    assert prior._traced is not None and prior._traced[0][-1] == "bfloat16"  # the graph really was traced
    assert torch.equal(traced, low)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's own autocast: eager, no 2nd cast
        assert torch.equal(prior.denoise(x, sigma), low)
    prior.precision = "float16"  # eager only (a traced float16 graph rounds differently)
    with torch.no_grad():
        half = prior.denoise(x, sigma)
    assert prior._traced[0][-1] == "bfloat16" and half.dtype == torch.float32
    assert float((half - full).norm() / full.norm()) < 5e-3
    prior.precision = "bfloat16"
    # with autograd (DPS) the gradient reaches the float32 input through the autocast network
    xg = x.clone().requires_grad_(True)
    prior.denoise(xg, sigma).sum().backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()
    prior.precision = "float32"
    with torch.no_grad():
        assert torch.equal(prior.denoise(x, sigma), full)  # a later float32 run re-traces: the same numbers
    with pytest.raises(ValueError, match="bfloat16"):
        check_precision("fp8")
    prior.precision = "half"
    with pytest.raises(ValueError, match="unknown network precision 'half'"):
        prior.denoise(x, sigma)


def test_a_runs_precision_holds_in_its_thread_whatever_another_run_sets():
    """Two runs on one prior in two threads: each states its precision at its start; the network calls of each use
    its own (the other's start used to switch it mid-run), a thread that set none uses the value set last."""
    import threading

    p = _tiny_prior()
    seen: dict[str, list[bool]] = {"bf16": [], "fp32": []}
    label = threading.local()
    p.network.register_forward_pre_hook(lambda *a: seen[label.name].append(torch.is_autocast_enabled("cpu")))
    first, second = threading.Barrier(2), threading.Barrier(2)

    def run(name: str, precision: str) -> None:
        label.name = name
        p.precision = precision  # the run's start
        first.wait()  # both have started: the other one's value was set after or before this one's
        with torch.no_grad():
            p.denoise(torch.randn(1, 1, 32, 32), 0.5)
        second.wait()

    threads = [threading.Thread(target=run, args=("bf16", "bfloat16")),
               threading.Thread(target=run, args=("fp32", "float32"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"bf16": [True], "fp32": [False]}
    assert p.precision in ("bfloat16", "float32")  # this thread set none: the last value set
    p.precision = "float32"
    assert p.precision == "float32"


def test_cosine_learning_rate_anneals_from_the_rate_to_zero():
    from napari_diffrecon.priors.training import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-3, steps=100, lr_schedule="cosine")
    rates = [learning_rate(cfg, k) for k in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[50] == pytest.approx(5e-4) and rates[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # never rises: a resumed run continues it
    assert {learning_rate(TrainConfig(lr=2e-4, steps=10), k) for k in range(10)} == {2e-4}  # the default: constant
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(TrainConfig(lr_schedule="step"), 0)


def test_a_card_whose_weights_have_other_shapes_names_the_files(tmp_path):
    """Weights of another channel count gave torch's multi-line size-mismatch message, naming neither file."""
    import json
    import shutil

    from napari_diffrecon.priors import CardError, load_prior
    from napari_diffrecon.priors.registry import prior_path

    src = prior_path("pet-phantom-128")
    shutil.copy(src.with_suffix(".safetensors"), tmp_path / "p.safetensors")
    card = json.loads(src.read_text())
    card["channels"] = 2  # the weights are a 1-channel network's
    (tmp_path / "p.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match=r"p\.safetensors do not fit the network p\.json describes \(2 channel"):
        load_prior(tmp_path / "p.json")
