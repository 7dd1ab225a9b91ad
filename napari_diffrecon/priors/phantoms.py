"""Procedural anatomical phantoms for training CT and PET priors without patient data.

One anatomy generator draws a random axial cross-section (abdomen, thorax, pelvis or head) as a
map of tissue classes plus smooth texture fields; modality tables turn it into CT Hounsfield units
or PET activity. Realism that matters to a prior (and that flat ellipse phantoms lack): irregular
organ outlines, fat layers and septa, trabecular bone, cortical rims, vessel trees in the lung,
bowel gas, soft-tissue texture, lesions, partial volume (drawn at 2× and averaged down), random
fields of view from the whole body down to a zoomed spine, and (CT) the scanner's blur and correlated noise.

Everything is numpy + scipy, seeded by a ``numpy.random.Generator``; no data is read or downloaded.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.transform import resize

__all__ = ["TISSUES", "anatomy", "ct_phantom", "pet_phantom", "phantom_batch"]

# Tissue classes: (CT HU mean, CT texture HU, PET activity mean relative to soft tissue).
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (-1000.0, 0.0, 0.0),
    "lung": (-850.0, 30.0, 0.25),
    "fat": (-100.0, 12.0, 0.35),
    "muscle": (50.0, 10.0, 1.0),
    "skin": (40.0, 8.0, 0.8),
    "liver": (60.0, 8.0, 2.2),
    "spleen": (48.0, 8.0, 1.8),
    "kidney": (32.0, 10.0, 3.0),
    "fluid": (8.0, 4.0, 0.3),
    "bladder": (5.0, 3.0, 8.0),
    "blood": (42.0, 5.0, 1.6),
    "contrast": (180.0, 20.0, 1.6),
    "heart": (45.0, 6.0, 5.0),
    "bowel": (35.0, 15.0, 1.4),
    "gas": (-950.0, 30.0, 0.0),
    "cortical": (1100.0, 150.0, 0.5),
    "trabecular": (250.0, 120.0, 1.3),
    "marrow": (60.0, 30.0, 1.5),
    "brain_gm": (40.0, 4.0, 6.0),
    "brain_wm": (28.0, 4.0, 2.5),
    "csf": (6.0, 3.0, 0.1),
    "lesion": (0.0, 10.0, 1.0),  # contrast drawn per lesion
}
_NAMES = list(TISSUES)
_IDX = {n: i for i, n in enumerate(_NAMES)}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


class _Canvas:
    """Tissue label map with per-pixel overrides (value offsets for lesions/contrast)."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n = n
        self.rng = rng
        self.X, self.Y = _grid(n)
        self.label = np.full((n, n), _IDX["air"], dtype=np.int16)
        self.offset_hu = np.zeros((n, n), dtype=np.float32)
        self.offset_pet = np.zeros((n, n), dtype=np.float32)

    def blob(
        self,
        cx: float,
        cy: float,
        a: float,
        b: float,
        theta: float = 0.0,
        rough: float = 0.06,
        harmonics: np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean mask of a Fourier-perturbed ellipse (irregular organ outline), computed in its bounding box."""
        if harmonics is None:
            harmonics = self.harmonics(rough)
        out = np.zeros((self.n, self.n), dtype=bool)
        reach = max(a, b) * (1 + float(np.abs(harmonics[:, 0]).sum()))
        lo = lambda c: int(np.clip(np.floor(((c - reach) + 1) / 2 * self.n) - 1, 0, self.n))  # noqa: E731
        hi = lambda c: int(np.clip(np.ceil(((c + reach) + 1) / 2 * self.n) + 1, 0, self.n))  # noqa: E731
        ys, xs = slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return out
        ct, st = np.cos(theta), np.sin(theta)
        dx, dy = self.X[ys, xs] - cx, self.Y[ys, xs] - cy
        xr, yr = (dx * ct + dy * st) / a, (-dx * st + dy * ct) / b
        r = np.hypot(xr, yr)
        phi = np.arctan2(yr, xr)
        rad = np.ones_like(r)
        for k, (amp, ph) in enumerate(harmonics, start=2):
            rad += amp * np.cos(k * phi + ph)
        out[ys, xs] = r < rad
        return out

    def harmonics(self, rough: float, n: int = 5) -> np.ndarray:
        k = np.arange(2, 2 + n)
        return np.stack([self.rng.normal(0, rough / k), self.rng.uniform(0, 2 * np.pi, n)], 1)

    def paint(self, mask: np.ndarray, tissue: str, within: np.ndarray | None = None) -> None:
        m = mask if within is None else mask & within
        self.label[m] = _IDX[tissue]

    def is_(self, *tissues: str) -> np.ndarray:
        return np.isin(self.label, [_IDX[t] for t in tissues])


def _smooth_noise(n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal((n, n)), scale, mode="wrap")
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _trabecular(n: int, rng: np.random.Generator, period: float) -> np.ndarray:
    """Sponge-like pattern in [0, 1]: thresholded band-pass noise (trabecular bone), softened by a random amount.

    The softening (a tenth to a half of the period) stands for the marrow between the struts and the scanner's blur:
    in a clinical CT the struts are finer than a voxel and show as a mottled grey, not as a crisp maze.
    """
    w = rng.standard_normal((n, n))
    band = ndimage.gaussian_filter(w, period * 0.35) - ndimage.gaussian_filter(w, period)
    pattern = (np.abs(band) < 0.35 * band.std()).astype(np.float32)
    return ndimage.gaussian_filter(pattern, period * rng.uniform(0.1, 0.5))


def _scanner(img: np.ndarray, zoom: float, rng: np.random.Generator, streaks: bool = False) -> np.ndarray:
    """What a clinical CT adds to anatomy: the system blur and correlated (ramp-filtered) quantum noise.

    The blur's FWHM is 0.6–3 mm (log-uniform: thick slices and soft kernels blur more), drawn in the output's pixels
    for a whole-body field of view of 300–450 mm shown at ``zoom``; the noise has the band-pass power spectrum of
    filtered back-projection (|f| times a smooth apodisation) and a standard deviation of 0–15 HU (none in a fifth
    of the images). With ``streaks``, 60 % of the images also get :func:`_streaks`.
    """
    n = img.shape[0]
    pixel_mm = rng.uniform(300.0, 450.0) / (n * zoom)
    fwhm_px = float(np.exp(rng.uniform(np.log(0.6), np.log(3.0)))) / pixel_mm
    out = ndimage.gaussian_filter(img, fwhm_px / 2.355) if fwhm_px > 0.5 else img
    if rng.random() < 0.8:
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
        nps = f * np.exp(-((f / rng.uniform(0.15, 0.5)) ** 2))
        noise = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * np.sqrt(nps)))
        out = out + noise / (noise.std() + 1e-12) * rng.uniform(0.0, 15.0)
    if streaks and rng.random() < 0.6:
        out = out + _streaks(n, rng)
    return out.astype(np.float32)


def _streaks(n: int, rng: np.random.Generator) -> np.ndarray:
    """Streak noise of photon starvation: thin bright and dark lines along one direction, 5–30 HU.

    Where the beam crosses the most tissue (side to side through the shoulders or the pelvis) few photons arrive and
    filtered back-projection smears their noise along those rays (pydicom's CT_small shows such lines across the
    whole slice). Drawn as white noise stretched 8–60 pixels along a direction within 30° of the horizontal (in half
    of the images, any direction), narrow across it.
    """
    angle = rng.uniform(-30.0, 30.0) if rng.random() < 0.5 else rng.uniform(0.0, 180.0)
    m = int(np.ceil(n * 1.5))
    w = ndimage.gaussian_filter(rng.standard_normal((m, m)), (rng.uniform(0.4, 1.0), rng.uniform(8.0, 60.0)))
    w = ndimage.rotate(w, angle, reshape=False, order=1, mode="reflect")
    lo = (m - n) // 2
    w = w[lo : lo + n, lo : lo + n]
    return (w / (w.std() + 1e-12) * rng.uniform(5.0, 30.0)).astype(np.float32)


def _body(cv: _Canvas, region: str) -> dict[str, object]:
    rng = cv.rng
    a = rng.uniform(0.8, 0.98)
    b = a * rng.uniform(0.62, 0.85) if region != "thorax" else a * rng.uniform(0.65, 0.8)
    cy = rng.uniform(-0.05, 0.05)
    h = cv.harmonics(0.035)
    outer = cv.blob(0, cy, a, b, harmonics=h)
    t_skin = rng.uniform(0.008, 0.015)
    t_fat = rng.uniform(0.02, 0.1)
    t_musc = rng.uniform(0.025, 0.06)
    cv.paint(outer, "skin")
    fat = cv.blob(0, cy, a - t_skin, b - t_skin, harmonics=h)
    cv.paint(fat, "fat")
    wall = cv.blob(0, cy, a - t_skin - t_fat, b - t_skin - t_fat * rng.uniform(0.5, 1.2), harmonics=h)
    cv.paint(wall, "muscle")
    ia, ib = a - t_skin - t_fat - t_musc, b - t_skin - t_fat - t_musc
    cavity = cv.blob(0, cy, ia, ib, harmonics=h)
    cv.paint(cavity, "fat")
    return {"a": a, "b": b, "cy": cy, "ia": ia, "ib": ib, "cavity": cavity, "outer": outer}


def _spine(cv: _Canvas, body: dict, zoom_ref: list, detail: bool = False, thorax: bool = False) -> None:
    """Vertebra, paraspinal muscles; with ``detail`` also :func:`_spine_detail` (``thorax``: with rib heads)."""
    rng = cv.rng
    ib, cy = float(body["ib"]), float(body["cy"])
    r = rng.uniform(0.075, 0.11) * (float(body["a"]) / 0.85)
    sx, sy = rng.normal(0, 0.01), cy + ib - r * rng.uniform(1.6, 2.4)
    # paraspinal muscles with fat septa
    muscles = []
    for side in (-1, 1):
        m = cv.blob(sx + side * r * 1.35, sy + r * 1.5, r * 1.25, r * 1.1, theta=side * 0.3, rough=0.08)
        cv.paint(m, "muscle", within=cv.is_("fat", "muscle"))
        muscles.append(m)
        for _ in range(rng.integers(1, 4)):
            sep = cv.blob(
                sx + side * r * rng.uniform(0.8, 2.0), sy + r * rng.uniform(1.0, 2.2),
                r * rng.uniform(0.6, 1.5), r * 0.06, theta=rng.uniform(0, np.pi), rough=0.02,
            )
            cv.paint(sep, "fat", within=m)
    if detail:
        _spine_detail(cv, sx, sy, r, muscles, thorax)
    body_v = cv.blob(sx, sy, r, r * rng.uniform(0.8, 0.95), rough=0.03)
    cv.paint(body_v, "cortical")
    inner = cv.blob(sx, sy, r * 0.86, r * 0.8, rough=0.03)
    cv.paint(inner, "trabecular")
    # posterior arch, canal, spinous and transverse processes
    canal_c = sy + r * 1.35
    arch = cv.blob(sx, canal_c, r * 0.72, r * 0.62, rough=0.02)
    cv.paint(arch, "cortical")
    canal = cv.blob(sx, canal_c, r * 0.5, r * 0.42, rough=0.02)
    cv.paint(canal, "csf")
    spin = cv.blob(sx, canal_c + r * 0.9, r * 0.16, r * 0.55, rough=0.03)
    cv.paint(spin, "cortical")
    for side in (-1, 1):
        tp = cv.blob(sx + side * r * 0.95, canal_c - r * 0.1, r * 0.6, r * 0.14, theta=side * 0.35, rough=0.03)
        cv.paint(tp, "cortical")
    zoom_ref.append((sx, sy + r * 0.5, r))


def _spine_detail(cv: _Canvas, sx: float, sy: float, r: float, muscles: list, thorax: bool) -> None:
    """What a zoomed clinical slice of the spine shows that the plain phantom lacks (pydicom's CT_small, 0.66 mm):

    - fat striations in the paraspinal muscles: 3–9 thin dark lines per side along the muscle's fibres;
    - thick laminae, a roof of bone from the pedicles down to the spinous process;
    - in the thorax, the rib heads: a rib leaves the back corner of the vertebral body on each side, runs back and out
      along the transverse process, then turns out and forward round the chest wall; a cortical shell round marrow,
      drawn as a chain of short overlapping segments, kept out of the lung (whose vessels included) and of the air.

    Drawn before the vertebra, so the bone painted after it keeps its outline.
    """
    rng = cv.rng
    for side, m in zip((-1, 1), muscles, strict=True):
        for _ in range(int(rng.integers(3, 10))):
            ang = side * 0.3 + np.pi / 2 + rng.normal(0, 0.35)  # roughly along the muscle (front to back)
            sep = cv.blob(
                sx + side * r * rng.uniform(0.6, 2.3), sy + r * rng.uniform(0.8, 2.5),
                r * rng.uniform(0.25, 0.7), r * rng.uniform(0.015, 0.035), theta=ang, rough=0.02,
            )
            cv.paint(sep, "fat", within=m & cv.is_("muscle"))
    canal_c = sy + r * 1.35
    for side in (-1, 1):  # laminae: from the pedicle down and in to the spinous process's base
        lx, ly, theta = sx + side * r * 0.32, canal_c + r * 0.42, -side * rng.uniform(0.75, 1.05)
        lam = cv.blob(lx, ly, r * rng.uniform(0.45, 0.58), r * rng.uniform(0.14, 0.22), theta=theta, rough=0.03)
        cv.paint(lam, "cortical")
        cv.paint(cv.blob(lx, ly, r * 0.35, r * 0.07, theta=theta), "marrow", within=lam)
    if not thorax:
        return
    for side in (-1, 1):
        if rng.random() < 0.15:
            continue
        x, y = sx + side * r * rng.uniform(0.8, 1.0), sy + r * rng.uniform(0.35, 0.65)  # the body's back corner
        heading = rng.uniform(0.35, 0.8)  # radians from the horizontal, positive = backwards (+y is posterior)
        bend = rng.uniform(-0.35, -0.15)  # per segment: out and then forward round the chest wall
        rr = r * rng.uniform(0.2, 0.3)  # half-thickness
        shell = np.zeros_like(cv.label, dtype=bool)
        for _ in range(int(rng.integers(4, 9))):  # overlapping segments make one bent bone
            seg = r * rng.uniform(0.35, 0.5)
            cxs, cys = x + side * np.cos(heading) * seg / 2, y + np.sin(heading) * seg / 2
            theta = heading if side > 0 else np.pi - heading
            shell |= cv.blob(cxs, cys, seg * 0.8, rr, theta=theta, rough=0.01)
            x, y = x + side * np.cos(heading) * seg, y + np.sin(heading) * seg
            heading += bend
        shell &= ~(cv.is_("air", "skin") | ndimage.binary_fill_holes(cv.is_("lung")))
        parts, n_parts = ndimage.label(shell)
        if n_parts > 1:  # the lung cut the rib: keep its largest piece, no bone specks
            shell = parts == 1 + int(np.argmax(ndimage.sum_labels(shell, parts, range(1, n_parts + 1))))
        cv.paint(shell, "cortical")
        cortex = max(1, int(round(rr * cv.n / 2 * rng.uniform(0.3, 0.45))))  # pixels of the canvas
        cv.paint(ndimage.binary_erosion(shell, iterations=cortex), "marrow")


def _vessels(cv: _Canvas, x: float, y: float, n: int, rmin: float, rmax: float, spread: float, within: np.ndarray,
             tissue: str = "blood") -> None:
    rng = cv.rng
    for _ in range(n):
        vx, vy = x + rng.normal(0, spread), y + rng.normal(0, spread)
        rv = rng.uniform(rmin, rmax)
        cv.paint(cv.blob(vx, vy, rv, rv * rng.uniform(0.7, 1.0), theta=rng.uniform(0, np.pi), rough=0.02),
                 tissue, within=within)


def _abdomen(cv: _Canvas, body: dict) -> None:
    rng = cv.rng
    ia, ib, cy, cav = float(body["ia"]), float(body["ib"]), float(body["cy"]), body["cavity"]
    # liver (patient right = image left), spleen, kidneys, great vessels, bowel
    liver = cv.blob(-ia * 0.45, cy - ib * 0.1, ia * rng.uniform(0.35, 0.55), ib * rng.uniform(0.5, 0.75),
                    theta=rng.uniform(-0.4, 0.4), rough=0.08)
    cv.paint(liver, "liver", within=cav)
    _vessels(cv, -ia * 0.45, cy - ib * 0.1, int(rng.integers(3, 10)), 0.008, 0.025, 0.12, liver & cav,
             tissue=rng.choice(["blood", "contrast"]))
    if rng.random() < 0.8:
        spleen = cv.blob(ia * 0.6, cy + ib * 0.1, ia * 0.18, ib * 0.3, theta=rng.uniform(-0.6, 0.6), rough=0.08)
        cv.paint(spleen, "spleen", within=cav)
    for side in (-1, 1):
        if rng.random() < 0.85:
            kx, ky = side * ia * rng.uniform(0.3, 0.42), cy + ib * rng.uniform(0.35, 0.55)
            k = cv.blob(kx, ky, ia * 0.11, ib * 0.2, theta=side * rng.uniform(0.2, 0.7), rough=0.05)
            cv.paint(k, "kidney", within=cav)
            cv.paint(cv.blob(kx - side * 0.02, ky, ia * 0.04, ib * 0.07, rough=0.1), "fluid", within=k)
    vessel = rng.choice(["blood", "contrast"])
    ar = rng.uniform(0.025, 0.045)
    cv.paint(cv.blob(ia * 0.08, cy + ib * 0.45, ar, ar, rough=0.01), vessel, within=cav)
    cv.paint(cv.blob(-ia * 0.12, cy + ib * 0.42, ar * 1.2, ar * 0.8, rough=0.02), vessel, within=cav)
    free = cav & cv.is_("fat")
    for _ in range(int(rng.integers(6, 22))):
        bx, by = rng.uniform(-ia * 0.7, ia * 0.7), cy + rng.uniform(-ib * 0.8, ib * 0.3)
        br = rng.uniform(0.03, 0.09)
        loop = cv.blob(bx, by, br, br * rng.uniform(0.5, 1.0), theta=rng.uniform(0, np.pi), rough=0.1)
        cv.paint(loop, "bowel", within=free)
        content = rng.choice(["fluid", "gas", "contrast", "bowel"], p=[0.35, 0.3, 0.15, 0.2])
        inner = cv.blob(bx, by, br * 0.7, br * 0.7 * rng.uniform(0.5, 1.0), rough=0.15)
        cv.paint(inner, str(content), within=loop & free)


def _thorax(cv: _Canvas, body: dict) -> None:
    rng = cv.rng
    ia, ib, cy, cav = float(body["ia"]), float(body["ib"]), float(body["cy"]), body["cavity"]
    for side in (-1, 1):
        lx = side * ia * rng.uniform(0.45, 0.55)
        lung = cv.blob(lx, cy, ia * rng.uniform(0.38, 0.48), ib * rng.uniform(0.7, 0.9), theta=side * 0.15, rough=0.05)
        cv.paint(lung, "lung", within=cav)
        # vessel tree: many small round/oblong vessels, larger towards the hilum
        for _ in range(int(rng.integers(25, 70))):
            t = rng.random()
            vx = lx - side * ia * 0.3 * (1 - t) + rng.normal(0, 0.12)
            vy = cy + rng.normal(0, 0.2)
            rv = 0.004 + 0.02 * (1 - t) ** 2
            cv.paint(cv.blob(vx, vy, rv * rng.uniform(1, 2.5), rv, theta=rng.uniform(0, np.pi), rough=0.02),
                     "blood", within=lung)
        if rng.random() < 0.3:  # nodule
            rn = rng.uniform(0.01, 0.035)
            cv.paint(cv.blob(lx + rng.normal(0, 0.1), cy + rng.normal(0, 0.2), rn, rn, rough=0.15), "muscle",
                     within=lung)
    heart = cv.blob(ia * 0.1, cy - ib * 0.15, ia * rng.uniform(0.25, 0.35), ib * rng.uniform(0.4, 0.55),
                    theta=rng.uniform(-0.6, -0.2), rough=0.05)
    cv.paint(heart, "heart", within=cav)
    ch = cv.blob(ia * 0.05, cy - ib * 0.2, ia * 0.14, ib * 0.22, theta=-0.4, rough=0.08)
    cv.paint(ch, str(rng.choice(["blood", "contrast"])), within=heart)
    ar = rng.uniform(0.03, 0.05)
    cv.paint(cv.blob(ia * 0.1, cy + ib * 0.4, ar, ar, rough=0.01), "blood", within=cav)
    # ribs round the wall, sternum in front
    a, b = float(body["a"]), float(body["b"])
    for ang in np.linspace(0.15, np.pi - 0.15, int(rng.integers(6, 11))):
        for side in (-1, 1):
            if rng.random() < 0.75:
                rx, ry = side * (ia + 0.015) * np.cos(ang), cy + (ib + 0.015) * np.sin(ang - np.pi / 2) * 0.98
                rr = rng.uniform(0.012, 0.022)
                rib = cv.blob(rx, ry, rr * 1.6, rr, theta=ang * side, rough=0.03)
                cv.paint(rib, "cortical")
                cv.paint(cv.blob(rx, ry, rr * 1.1, rr * 0.55, theta=ang * side), "marrow", within=rib)
    cv.paint(cv.blob(0, cy - ib - 0.01, 0.035, 0.015, rough=0.02), "cortical")
    del a, b


def _pelvis(cv: _Canvas, body: dict) -> None:
    rng = cv.rng
    ia, ib, cy, cav = float(body["ia"]), float(body["ib"]), float(body["cy"]), body["cavity"]
    bl = cv.blob(0, cy - ib * 0.25, ia * rng.uniform(0.15, 0.3), ib * rng.uniform(0.2, 0.35), rough=0.06)
    cv.paint(bl, "bladder", within=cav)
    for side in (-1, 1):
        il = cv.blob(side * ia * 0.62, cy + ib * 0.15, ia * 0.3, ib * 0.12, theta=side * rng.uniform(0.6, 1.1),
                     rough=0.05)
        cv.paint(il, "cortical")
        cv.paint(cv.blob(side * ia * 0.62, cy + ib * 0.15, ia * 0.24, ib * 0.07, theta=side * 0.85), "trabecular",
                 within=il)
        if rng.random() < 0.6:
            fr = rng.uniform(0.08, 0.12)
            fh = cv.blob(side * ia * 0.78, cy - ib * 0.2, fr, fr, rough=0.01)
            cv.paint(fh, "cortical")
            cv.paint(cv.blob(side * ia * 0.78, cy - ib * 0.2, fr * 0.85, fr * 0.85), "trabecular", within=fh)
    rec = cv.blob(0, cy + ib * 0.45, 0.05, 0.04, rough=0.1)
    cv.paint(rec, str(rng.choice(["gas", "bowel"])), within=cav)


def _head(cv: _Canvas, zoom_ref: list) -> None:
    rng = cv.rng
    a = rng.uniform(0.65, 0.85)
    b = a * rng.uniform(1.1, 1.3)
    h = cv.harmonics(0.02)
    cv.paint(cv.blob(0, 0, a, b, harmonics=h), "skin")
    t_sk = rng.uniform(0.04, 0.08)
    cv.paint(cv.blob(0, 0, a - 0.03, b - 0.03, harmonics=h), "cortical")
    cv.paint(cv.blob(0, 0, a - 0.03 - t_sk * 0.35, b - 0.03 - t_sk * 0.35, harmonics=h), "trabecular")
    cv.paint(cv.blob(0, 0, a - 0.03 - t_sk * 0.7, b - 0.03 - t_sk * 0.7, harmonics=h), "cortical")
    ba, bb = a - 0.03 - t_sk, b - 0.03 - t_sk
    brain = cv.blob(0, 0, ba, bb, harmonics=h)
    cv.paint(brain, "csf")
    cv.paint(cv.blob(0, 0, ba - 0.012, bb - 0.012, harmonics=h), "brain_gm")
    # white matter: smooth irregular region inside, gyri by thresholded noise near the cortex
    wm_field = _smooth_noise(cv.n, cv.n / 40, rng)
    r = np.hypot(cv.X / ba, cv.Y / bb)
    wm = (r < 0.82 + 0.12 * wm_field) & brain
    cv.paint(wm, "brain_wm")
    sulci = (np.abs(_smooth_noise(cv.n, cv.n / 60, rng)) < 0.12) & (r > 0.7) & brain
    cv.paint(sulci, "csf")
    # ventricles and falx
    vs = rng.uniform(0.5, 1.5)
    for side in (-1, 1):
        cv.paint(cv.blob(side * 0.07 * vs, -0.05, 0.05 * vs, 0.22 * vs, theta=side * 0.25, rough=0.12), "csf",
                 within=brain)
    cv.paint((np.abs(cv.X) < 0.006) & (np.abs(cv.Y) > 0.25) & brain, "csf")
    zoom_ref.append((0.0, 0.0, 0.3))


def _lesions(cv: _Canvas, inside: np.ndarray) -> None:
    rng = cv.rng
    soft = inside & cv.is_("liver", "spleen", "kidney", "muscle", "brain_gm", "brain_wm", "heart", "fat")
    ys, xs = np.nonzero(soft)
    if len(xs) == 0:
        return
    for _ in range(int(rng.integers(0, 4))):
        i = rng.integers(len(xs))
        lx, ly = cv.X[ys[i], xs[i]], cv.Y[ys[i], xs[i]]
        lr = rng.uniform(0.01, 0.05)
        m = cv.blob(lx, ly, lr, lr * rng.uniform(0.6, 1), theta=rng.uniform(0, np.pi), rough=0.15) & soft
        cv.offset_hu[m] += rng.choice([-1, 1]) * rng.uniform(15, 70)
        cv.offset_pet[m] += rng.uniform(1.0, 8.0) * (rng.random() < 0.8)
    for _ in range(int(rng.integers(0, 3))):  # calcifications
        i = rng.integers(len(xs))
        rc = rng.uniform(0.003, 0.01)
        m = cv.blob(cv.X[ys[i], xs[i]], cv.Y[ys[i], xs[i]], rc, rc, rough=0.1)
        cv.offset_hu[m] += rng.uniform(200, 800)


def anatomy(n: int, rng: np.random.Generator, region: str | None = None, detail: bool = False) -> tuple[_Canvas, list]:
    """Draw one random cross-section at ``n × n``; returns the canvas and points of interest for zooming.

    ``detail`` adds the spine's finer anatomy (:func:`_spine_detail`); without it the draws are those the shipped
    priors were trained on.
    """
    cv = _Canvas(n, rng)
    region = region or str(rng.choice(["abdomen", "thorax", "pelvis", "head"], p=[0.35, 0.3, 0.15, 0.2]))
    zoom_ref: list = []
    if region == "head":
        _head(cv, zoom_ref)
    else:
        body = _body(cv, region)
        {"abdomen": _abdomen, "thorax": _thorax, "pelvis": _pelvis}[region](cv, body)
        _spine(cv, body, zoom_ref, detail=detail, thorax=region == "thorax")
        # subcutaneous/intermuscular vessels
        _vessels(cv, 0.0, float(body["cy"]), int(rng.integers(5, 20)), 0.004, 0.012, 0.4, cv.is_("fat"))
    _lesions(cv, cv.label != _IDX["air"])
    return cv, zoom_ref


def _render(cv: _Canvas, table: int) -> np.ndarray:
    """Label map → values (column ``table`` of :data:`TISSUES`: 0 = HU, 2 = PET) plus texture."""
    vals = np.array([TISSUES[t][table] for t in _NAMES], dtype=np.float32)
    img = vals[cv.label]
    rng = cv.rng
    n = cv.n
    if table == 0:
        tex = np.array([TISSUES[t][1] for t in _NAMES], dtype=np.float32)[cv.label]
        img = img + tex * (0.6 * _smooth_noise(n, n / 60, rng) + 0.4 * _smooth_noise(n, n / 200, rng))
        trab = cv.label == _IDX["trabecular"]
        if trab.any():
            pattern = _trabecular(n, rng, period=n / rng.uniform(60, 120))
            img = np.where(trab, img + (pattern - 0.4) * rng.uniform(80, 400), img)
        img = img + cv.offset_hu
    else:
        img = img * (1 + 0.15 * _smooth_noise(n, n / 40, rng)) + cv.offset_pet
        img = np.clip(img, 0, None)
    return img


def _view(img: np.ndarray, out: int, rng: np.random.Generator, zoom_ref: list,
          max_zoom: float) -> tuple[np.ndarray, float]:
    """Random field of view: the whole section, or a zoomed crop (often around the spine), resized to ``out``.

    Returns the view and its zoom (the canvas's side over the crop's).
    """
    n = img.shape[0]
    zoom = 1.0 if rng.random() < 0.45 else float(np.exp(rng.uniform(0, np.log(max_zoom))))
    side = max(int(round(n / zoom)), out)
    if side >= n:
        crop = img
    else:
        if zoom_ref and rng.random() < 0.5:
            px, py, _ = zoom_ref[0]
            cx, cy = (px + 1) / 2 * n + rng.normal(0, side / 6), (py + 1) / 2 * n + rng.normal(0, side / 6)
        else:
            cx, cy = rng.uniform(side / 2, n - side / 2, size=2)
        x0 = int(np.clip(cx - side / 2, 0, n - side))
        y0 = int(np.clip(cy - side / 2, 0, n - side))
        crop = img[y0 : y0 + side, x0 : x0 + side]
    res = resize(crop, (out, out), order=1, anti_aliasing=True, preserve_range=True)
    if rng.random() < 0.5:
        res = res[:, ::-1]
    return np.ascontiguousarray(res, dtype=np.float32), n / crop.shape[0]


def ct_phantom(size: int = 128, rng: np.random.Generator | None = None, region: str | None = None,
               max_zoom: float = 5.0, detail: bool = False) -> np.ndarray:
    """One random CT cross-section in Hounsfield units, ``(size, size)`` float32.

    Drawn at up to 2× the output resolution over the zoomed field, so edges carry partial volume, then blurred and
    noised as a clinical scanner would (:func:`_scanner`).

    Parameters
    ----------
    size : int
        Output side length.
    rng : numpy.random.Generator, optional
        Source of randomness (seed it for reproducible phantoms).
    region : {"abdomen", "thorax", "pelvis", "head"}, optional
        Anatomy; random when omitted.
    max_zoom : float
        Largest zoom factor of the random field of view (1 = whole section only); the canvas (at most 512 pixels)
        caps it at 512 / ``size`` (4 at 128²), where the view is drawn at the output's resolution.
    detail : bool
        The spine's finer anatomy (fat striations, laminae, rib heads: :func:`_spine_detail`) and photon-starvation
        streaks (:func:`_streaks`); off, the draws are those the shipped CT prior was trained on
        (``builtin:ct-phantoms``; ``builtin:ct-phantoms-detailed`` has it on).
    """
    rng = rng if rng is not None else np.random.default_rng()
    n = int(min(2 * size * max(1.0, max_zoom), 512))
    cv, ref = anatomy(n, rng, region, detail=detail)
    img = _render(cv, 0)
    out, zoom = _view(img, size, rng, ref, max_zoom)
    out = _scanner(out, zoom, rng, streaks=detail)
    out += rng.normal(0, rng.uniform(0.5, 4.0), out.shape).astype(np.float32)  # faint fine-scale texture
    return np.clip(out, -1024.0, 3000.0)


def pet_phantom(size: int = 128, rng: np.random.Generator | None = None, region: str | None = None,
                fwhm_px: tuple[float, float] = (1.5, 4.0)) -> np.ndarray:
    """One random PET activity map, scaled to [0, 1] (99.5th percentile = 1), ``(size, size)`` float32.

    Same anatomy as :func:`ct_phantom` with FDG-like uptake (brain grey matter, heart, kidneys,
    bladder high; lung and fat low; hot lesions), blurred by a scanner resolution drawn from ``fwhm_px``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    n = 2 * size
    cv, ref = anatomy(n, rng, region)
    img = _render(cv, 2)
    img, _ = _view(img, size, rng, ref, max_zoom=1.6)
    fwhm = rng.uniform(*fwhm_px)
    img = ndimage.gaussian_filter(img, fwhm / 2.355)
    hi = np.percentile(img, 99.5)
    return np.clip(img / max(hi, 1e-6), 0, 1.2).astype(np.float32)


def phantom_batch(modality: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` phantoms ``(n, size, size)`` in native units (HU for CT, [0, 1] activity for PET)."""
    if modality == "ct":
        return np.stack([ct_phantom(size, rng) for _ in range(n)])
    if modality == "pet":
        return np.stack([pet_phantom(size, rng) for _ in range(n)])
    raise ValueError(f"phantoms exist for 'ct' and 'pet', not {modality!r}")
