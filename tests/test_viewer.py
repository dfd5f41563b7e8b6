"""The interactive viewer of report.html (medhybrid/infer/viewer.py and assets/viewer.js).

Without a browser: the geometry (display frame -> RAS, edge letters, acquisition planes), the budget
(block reduction, quantisation, what the page states) and the embedded arrays decoded back exactly.
In headless Chromium driven by Selenium: scrolling, overlays, window/level, the cursor readout, the
physical aspect of a sagittal acquisition, and no console error or network request.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medhybrid.data.synth import synth_study
from medhybrid.infer.render import DisplayFrame, render_panels, report_html, window_for
from medhybrid.infer.report import measure_lesions
from medhybrid.infer.viewer import display_world, lesion_findings, viewer_html
from medhybrid.infer.viewer_data import block_reduce, candidate_factors, fit_budget, quantise
from medhybrid.io.study import Study

PAGE_LIMIT = 20_000_000  # bytes per report.html (issue 15)


# --- helpers: a synthetic study, its page as study_outputs writes it, the viewer's data read back ---------------
def make_study(array: np.ndarray, affine: np.ndarray, fmt: str = "nifti", modality: str = "CT") -> Study:
    return Study(
        key="s0", array=array.astype(np.float32), affine=affine, modality=modality, source=Path("x"), source_format=fmt
    )


def axial_ct() -> tuple[Study, np.ndarray]:
    """synth study 1 (64x64x32, a lesion): stored i -> L, j -> P, k -> S, so the display frame is the array."""
    s = synth_study(0, 1)
    assert s.mask.any()
    return make_study(s.image, s.affine), s.mask


def acquired_as(plane: str, study: Study, mask: np.ndarray) -> tuple[Study, np.ndarray]:
    """The same voxels stored as a sagittal (i -> P, j -> I, k -> L) or coronal (i -> L, j -> I, k -> P)
    acquisition of the axial ``study`` (i -> L, j -> P, k -> S): columns, rows, slices as a scanner writes them."""
    z = study.spatial_shape[2]
    a0 = study.affine
    # stored voxel (i, j, k) is axial voxel (k, i, Z-1-j) (sagittal) or (i, k, Z-1-j) (coronal)
    axes = (1, 2, 0) if plane == "sagittal" else (0, 2, 1)
    affine = np.eye(4)
    affine[:3, 0] = a0[:3, axes[0]]
    affine[:3, 1] = -a0[:3, 2]  # rows from superior to inferior
    affine[:3, 2] = a0[:3, axes[2]]
    affine[:3, 3] = (a0 @ [0, 0, z - 1, 1])[:3]

    def store(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.transpose(axes)[:, ::-1, :])

    return make_study(store(study.array), affine), store(mask)


def as_sagittal(study: Study, mask: np.ndarray) -> tuple[Study, np.ndarray]:
    return acquired_as("sagittal", study, mask)


def saliency_for(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth uint8 map, like an upsampled Grad-CAM: a product of three random smooth profiles."""
    rng = np.random.default_rng(seed)
    profiles = [np.interp(np.arange(n), np.linspace(0, n - 1, 5), rng.random(5)) for n in shape]
    x, y, z = np.ix_(*(p.astype(np.float32) for p in profiles))
    return np.rint(x * y * z * 255).astype(np.uint8)


def page_for(
    study: Study,
    labels: np.ndarray | None,
    saliency: dict[str, np.ndarray],
    instance_numbers: list[int] | None = None,
    **kw: Any,
) -> bytes:
    """report.html as ``study_outputs._write_outputs`` renders it (key slices, viewer, report tables)."""
    frame = DisplayFrame(study.affine, study.spacing, two_d=study.is_2d, reorient=study.source_format != "medmnist")
    window = window_for(study.modality, "ct_soft_tissue" if study.modality == "CT" else None, study.array)
    slices, thumb = render_panels(study.array, labels, saliency, frame, window)
    assert thumb.startswith(b"\x89PNG")
    names = {0: "background", 1: "lesion"}
    lesions = (
        [les.model_dump() for les in measure_lesions(labels, study.spacing, {1: "lesion"})]
        if labels is not None
        else []
    )
    viewer = viewer_html(
        study,
        labels,
        saliency,
        frame,
        window,
        mask_names=names,
        finding_labels={les["label"]: les["name"] for les in lesions},
        instance_numbers=instance_numbers,
        **kw,
    )
    report = {
        "study_key": study.key,
        "probability": 0.9,
        "score_method": "classifier",
        "decision": "abnormal",
        "operating_point": {"threshold": 0.5, "method": "youden", "sensitivity": 0.8, "specificity": 0.7},
        "class_probabilities": None,
        "lesions": lesions,
        "structures": [],
        "qc": [],
        "qc_verdict": "ok",
        "patient": None,
        "model": {"name": "tiny", "task": "multitask", "weights_sha256": "0" * 64, "medhybrid_version": "0"},
        "source": {"format": study.source_format, "path": "x", "modality": study.modality, "shape": list(study.shape)},
        "outputs": {"mask": "mask.nii.gz", "saliency": [], "dicom_seg": None, "dicom_sr": None},
        "timings_s": {},
        "tta": False,
    }
    return report_html(report, slices, {}, viewer=viewer)


def viewer_data(page: bytes | str) -> dict[str, Any]:
    text = page.decode() if isinstance(page, bytes) else page
    match = re.search(r'<script type="application/json" id="mh-viewer-data">(.*?)</script>', text, re.S)
    assert match, "no viewer data in the page"
    return json.loads(match.group(1))


def decode(data: dict[str, Any], name: str) -> np.ndarray:
    """An embedded array back as ``(X, Y, Z)`` of its grid, as viewer.js reads it."""
    x, y, z = data["grids"][name]["shape"]
    prefix, b64 = data["data"][name].split(",", 1)
    assert prefix == "data:application/zlib;base64"
    raw = np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=np.uint8)
    if name == "image":  # low-byte plane, then high-byte plane
        n = x * y * z
        raw = raw[:n].astype(np.uint16) | (raw[n:].astype(np.uint16) << 8)
    return raw.reshape(z, y, x).transpose(2, 1, 0)


# --- geometry ---------------------------------------------------------------------------------------------
AFFINES = {
    "ras": np.diag([1.0, 1.0, 2.0, 1.0]),
    "lps_shifted": np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]]),
    "sagittal": np.array([[0, 0, -2.0, 1], [1.0, 0, 0, 2], [0, -1.0, 0, 3], [0, 0, 0, 1]]),
    "coronal": np.array([[-0.5, 0, 0, 0], [0, 0, 4.0, 0], [0, -0.5, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_display_world_puts_each_display_voxel_where_its_native_voxel_is(name: str) -> None:
    affine = AFFINES[name]
    shape = (5, 6, 7)
    frame = DisplayFrame(affine, np.linalg.norm(affine[:3, :3], axis=0), two_d=False)
    flat = frame(np.arange(np.prod(shape)).reshape(shape))
    world = display_world(frame, affine, shape)
    for idx in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in flat.shape)]:
        native = np.unravel_index(int(flat[idx]), shape)
        np.testing.assert_allclose(world @ [*idx, 1], affine @ [*native, 1], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(world[:3, :3], axis=0), frame.spacing)  # the spacing the page shows


LETTERS = {
    "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
}


@pytest.mark.parametrize("acquired", ["axial", "coronal", "sagittal"])
def test_views_start_with_the_acquisition_plane_in_one_convention(acquired: str) -> None:
    axial, axial_mask = axial_ct()
    study, mask = (axial, axial_mask) if acquired == "axial" else acquired_as(acquired, axial, axial_mask)
    data = viewer_data(page_for(study, mask, {}))
    ids = [v["id"] for v in data["views"]]
    assert ids[0] == acquired and sorted(ids) == ["axial", "coronal", "sagittal"]
    for v in data["views"]:
        assert v["letters"] == LETTERS[v["id"]], v["id"]
    # whatever the storage, the display volume is the same: the axial study's own array
    np.testing.assert_array_equal(decode(data, "image") + data["image"]["intercept"], axial.array)
    np.testing.assert_array_equal(decode(data, "mask"), axial_mask)


def test_a_sagittal_acquisition_is_the_same_display_volume_not_a_strip() -> None:
    axial, mask = axial_ct()
    sag, sag_mask = as_sagittal(axial, mask)
    a, b = viewer_data(page_for(axial, mask, {})), viewer_data(page_for(sag, sag_mask, {}))
    assert a["shape"] == b["shape"] == [64, 64, 32]
    np.testing.assert_array_equal(decode(a, "image"), decode(b, "image"))
    np.testing.assert_array_equal(decode(a, "mask"), decode(b, "mask"))
    np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-9)
    view = b["views"][0]  # sagittal: 64 columns of 0.75 mm (A-P), 32 rows of 2.5 mm (S-I)
    width = b["shape"][view["col"][0]] * b["spacing"][view["col"][0]]
    height = b["shape"][view["row"][0]] * b["spacing"][view["row"][0]]
    assert (width, height) == pytest.approx((48.0, 80.0))


def test_slice_numbers_are_instance_numbers_of_the_acquisition_axis() -> None:
    study, mask = axial_ct()
    numbers = [1000 - 3 * k for k in range(32)]  # stored order, numbered downward
    data = viewer_data(page_for(study, mask, {}, instance_numbers=numbers))
    axial = data["views"][0]
    assert axial["labels"][0] == "Instance 1000" and axial["labels"][31] == "Instance 907"
    assert data["views"][1]["labels"][0] == "Slice 1"  # reformatted planes: 1-based index
    sag, sag_mask = as_sagittal(study, mask)
    data = viewer_data(page_for(sag, sag_mask, {}, instance_numbers=numbers[:32] * 2))  # 64 sagittal slices
    assert data["views"][0]["labels"][:2] == ["Instance 1000", "Instance 997"]
    without = viewer_data(page_for(study, mask, {}))
    assert without["views"][0]["labels"][:2] == ["Slice 1", "Slice 2"]


# --- what is embedded -------------------------------------------------------------------------------------
def test_embedded_arrays_decode_to_the_exact_values() -> None:
    study, mask = axial_ct()
    sal = saliency_for(study.spatial_shape)
    page = page_for(study, mask, {"gradcam": sal})
    data = viewer_data(page)
    image = decode(data, "image") * data["image"]["slope"] + data["image"]["intercept"]
    np.testing.assert_array_equal(image, study.array)  # integer HU: exact, so the cursor shows real HU
    np.testing.assert_array_equal(decode(data, "mask"), mask)
    coarse = np.rint(block_reduce(sal, (2, 2, 2)))  # saliency: half the resolution per axis, block means
    assert data["grids"]["gradcam"] == {"shape": [32, 32, 16], "step": [2, 2, 2]}
    np.testing.assert_array_equal(decode(data, "gradcam"), coarse)
    assert "Volume shown at full resolution: 64x64x32 voxels of 0.75x0.75x2.5 mm" in page.decode()
    assert "value = q - 1024 HU (exact)" in page.decode()


def test_block_reduce_means_and_maxes_partial_blocks() -> None:
    a = np.arange(5 * 3 * 3, dtype=np.float32).reshape(5, 3, 3)
    mean = block_reduce(a, (2, 2, 3))
    assert mean.shape == (3, 2, 1)
    assert mean[0, 0, 0] == pytest.approx(a[0:2, 0:2, :].mean()) and mean[2, 1, 0] == pytest.approx(a[4:, 2:, :].mean())
    labels = np.zeros((5, 3, 3), dtype=np.uint8)
    labels[4, 2, 2] = 2
    labels[0, 0, 0] = 1
    biggest = block_reduce(labels, (2, 2, 2), "max")
    assert biggest.dtype == np.uint8 and biggest[2, 1, 1] == 2 and biggest[0, 0, 0] == 1 and biggest.sum() == 3


def test_candidate_factors_reduce_the_finest_axis_first() -> None:
    steps = list(candidate_factors((512, 512, 60), (0.7, 0.7, 5.0)))
    assert steps[:4] == [(1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 2, 1)]
    assert (7, 7, 1) in steps and (8, 8, 2) in steps  # through-plane only once in-plane is as coarse
    assert steps[-1] == (512, 512, 60)


def test_quantise_states_an_exact_or_bounded_map() -> None:
    hu = np.array([-1024.0, 0.0, 3071.0])
    q, slope, intercept = quantise(hu.copy(), integral=True)
    assert (slope, intercept) == (1.0, -1024.0) and np.array_equal(q * slope + intercept, hu)
    mr = np.random.default_rng(0).random(1000).astype(np.float32) * 3.7
    q, slope, intercept = quantise(mr.copy(), integral=False)
    assert q.dtype == np.uint16 and np.abs(q * slope + intercept - mr).max() <= slope / 2 + 1e-6


def test_over_budget_the_volume_is_reduced_and_the_page_says_so() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(96, 80, 40)).astype(np.float32)  # noise: barely compresses
    study = make_study(array, np.diag([-0.5, -0.5, 1.0, 1.0]))
    labels = np.zeros(study.spatial_shape, dtype=np.uint8)
    labels[10:13, 20:22, 5:7] = 1
    budget = 200_000
    page = page_for(study, labels, {"gradcam": saliency_for(study.spatial_shape)}, budget=budget).decode()
    data = viewer_data(page)
    assert sum(len(v) for v in data["data"].values()) <= budget
    x, y, z = data["shape"]
    assert x < 96 and y < 80 and x * y * z * 2 * 4 / 3 > budget / 4  # reduced, and not by far more than needed
    assert re.search(r"Volume shown at \d+x\d+x\d+ voxels of [\d.x]+ mm, from 96x80x40 \(each shown voxel", page)
    assert decode(data, "mask").max() == 1  # a small lesion survives the reduction (block max)
    frame = DisplayFrame(study.affine, study.spacing, two_d=False)
    emb, _ = fit_budget(frame(study.array), frame(labels), {}, frame.spacing, budget)
    assert emb.chars <= budget and emb.factors != (1, 1, 1)


@pytest.mark.slow
def test_a_512x512x300_ct_page_is_under_20_mb_and_quick() -> None:
    rng = np.random.default_rng(0)
    x, y = np.ogrid[-1:1:512j, -1:1:512j]
    body = np.where(x**2 + y**2 < 0.8, 40, -1000).astype(np.int16)
    array = np.repeat(body[:, :, None], 300, axis=2)
    array += rng.integers(-12, 13, size=array.shape, dtype=np.int16)  # CT noise, so it does not compress away
    study = make_study(array, np.diag([-0.7, -0.7, 1.0, 1.0]))
    del array
    labels = np.zeros(study.spatial_shape, dtype=np.uint8)
    labels[200:230, 250:270, 140:160] = 1
    saliency = {m: saliency_for(study.spatial_shape, seed) for seed, m in enumerate(("gradcam", "attention"))}
    start = time.perf_counter()
    page = page_for(study, labels, saliency)
    seconds = time.perf_counter() - start
    assert len(page) < PAGE_LIMIT and seconds < 20, (len(page), seconds)
    data = viewer_data(page)
    assert data["shape"] == [256, 256, 150]  # compressed (uncompressed, the budget would allow about 128x128x75)
    assert "from 512x512x300" in page.decode()


def test_findings_jump_to_a_voxel_of_each_component_largest_first() -> None:
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[2:4, 2:4, 1:3] = 1  # 8 voxels
    labels[10:15, 10:15, 5:8] = 1  # 75 voxels
    labels[10:15, 2, 2] = 1  # a line of 5 voxels
    found = lesion_findings(labels, {1: "lesion"}, voxel_ml=0.001)
    assert [(f.rank, f.of) for f in found] == [(1, 3), (2, 3), (3, 3)]
    assert [round(f.volume_ml, 3) for f in found] == [0.075, 0.008, 0.005]
    assert all(labels[f.at] == 1 for f in found)
    assert found[0].at == (12, 12, 6)  # the large component's centroid


def test_two_d_and_geometry_less_images() -> None:
    image = np.random.default_rng(0).random((40, 30, 1)).astype(np.float32) * 255
    png = make_study(image, np.diag([-1.0, -1.0, 1.0, 1.0]), fmt="png", modality="OT")
    page = page_for(png, None, {}).decode()
    data = viewer_data(page)
    assert [v["id"] for v in data["views"]] == ["image"] and data["views"][0]["letters"] is None
    assert not data["oriented"] and "no patient geometry" in page
    assert "Auto (0.5-99.5 %)" in page and "Soft tissue" not in page  # presets for a non-CT image
    assert 'class="mh-scroll" min="0" max="0" aria-label="Image slice" hidden' in page
    # a colour radiograph with geometry: one view, its letters, the channels averaged
    rgb = make_study(
        np.repeat(image[..., None], 3, axis=3), np.diag([-0.2, -0.2, 1.0, 1.0]), fmt="dicom", modality="DX"
    )
    page = page_for(rgb, None, {}).decode()
    data = viewer_data(page)
    assert data["views"][0]["letters"] == LETTERS["axial"] and "The 3 channels are averaged" in page
    np.testing.assert_allclose(
        decode(data, "image") * data["image"]["slope"] + data["image"]["intercept"], image, atol=0.01
    )


def test_the_page_names_no_url_and_the_report_is_kept() -> None:
    study, mask = axial_ct()
    page = page_for(study, mask, {"gradcam": saliency_for(study.spatial_shape)}).decode()
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", page.replace("</", "")), "a URL in the page"
    assert "data:image/png;base64," in page and "Key slices" in page and "Model card" in page
    assert len(page) < 2_000_000  # 64x64x32: well under a megabyte or two


def test_key_slices_are_full_size_with_a_legend_of_every_colour() -> None:
    import io

    from PIL import Image

    from medhybrid.infer.render import MASK_COLOURS, mask_colour

    study, mask = axial_ct()
    page = page_for(study, mask, {"gradcam": saliency_for(study.spatial_shape)}).decode()
    first = re.search(r'<figure><img src="data:image/png;base64,([^"]+)"', page)
    assert first is not None
    width, height = Image.open(io.BytesIO(base64.b64decode(first.group(1)))).size
    assert max(width, height) == 512  # not the 256 px thumbnails of before
    legend = re.search(r'<p class="muted legend">(.*?)</p>', page)
    assert legend is not None and "lesion (label 1)" in legend.group(1) and "Saliency" in legend.group(1)
    assert "rgb(255,64,64)" in legend.group(1)  # label 1's colour, as overlay_mask paints it
    # every label has a colour (label 6 was painted black before: 6 % 6 is the background's index)
    assert all(mask_colour(k).any() for k in range(1, 20))
    assert mask_colour(len(MASK_COLOURS)).tolist() == MASK_COLOURS[1].tolist()


# --- in a real browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    chromedriver = shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip(
            "no Chromium/chromedriver on this machine (`make browser` installs Debian's chromium and chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def open_page(driver: Any, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 20
    while (ready := driver.execute_script("return document.getElementById('mh-viewer').dataset.ready")) == "0":
        assert time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.05)
    assert ready == "1", driver.execute_script("return document.querySelector('.mh-status').textContent")


def canvas(driver: Any, view: str) -> Any:
    return driver.find_element("css selector", f'.mh-view[data-view="{view}"] canvas')


def pixels(driver: Any, view: str) -> np.ndarray:
    """The view's canvas as ``(H, W, 4)`` uint8."""
    w, h, b64 = driver.execute_script(
        """const c = arguments[0], d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let s = "";
        for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
        return [c.width, c.height, btoa(s)];""",
        canvas(driver, view),
    )
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(h, w, 4)


def slice_text(driver: Any, view: str) -> str:
    return str(driver.find_element("css selector", f'.mh-view[data-view="{view}"] .mh-slice').text)


def severe(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def axial_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Study, np.ndarray]:
    study, mask = axial_ct()
    path = tmp_path_factory.mktemp("viewer") / "report.html"
    path.write_bytes(page_for(study, mask, {"gradcam": saliency_for(study.spatial_shape)}, list(range(101, 133))))
    return path, study, mask


def test_browser_scrolls_toggles_windows_and_reads_out(driver: Any, axial_page: tuple[Path, Study, np.ndarray]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    path, study, mask = axial_page
    driver.get_log("browser")  # start with an empty log
    open_page(driver, path)
    # it opens on the lesion (the first finding), numbered by InstanceNumber
    lesion_z = int(np.argmax(np.count_nonzero(mask, axis=(0, 1)) > 0))
    first = slice_text(driver, "axial")
    assert first.startswith("Instance ") and mask[:, :, int(first.split()[1]) - 101].any()
    # keys scroll the acquisition plane: the number and the pixels change
    before = pixels(driver, "axial")
    canvas(driver, "axial").send_keys(Keys.ARROW_UP, Keys.ARROW_UP)
    assert (
        slice_text(driver, "axial") == f"Instance {int(first.split()[1]) + 2} ({int(first.split()[1]) - 100 + 2} of 32)"
    )
    assert np.abs(pixels(driver, "axial").astype(int) - before).sum() > 0
    # the wheel scrolls a reformatted plane
    coronal = slice_text(driver, "coronal")
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas(driver, "coronal")), 0, 120).perform()
    assert slice_text(driver, "coronal") != coronal
    # the findings list jumps back to the lesion; the mask toggle changes pixels there, and only there
    driver.find_element("css selector", ".mh-findings button").click()
    z = int(slice_text(driver, "axial").split()[1]) - 101
    assert mask[:, :, z].any() and abs(z - lesion_z) <= mask[:, :, :].any(axis=(0, 1)).sum()
    with_mask = pixels(driver, "axial").astype(int)
    driver.find_element("css selector", '.mh-toggle[data-overlay="mask"]').click()
    without = pixels(driver, "axial").astype(int)
    changed = np.abs(with_mask - without).sum(axis=2) > 0
    assert changed.any()
    h, w = changed.shape
    rows, cols = np.nonzero(changed)
    xs, ys = np.nonzero(mask[:, :, z])  # axial view: column = i (R to L), row = j (A to P)
    assert (
        abs(cols.mean() - (xs.mean() + 0.5) * w / 64) < w / 16
        and abs(rows.mean() - (ys.mean() + 0.5) * h / 64) < h / 16
    )
    assert (with_mask[changed][:, 0] - with_mask[changed][:, 1]).mean() > 30  # the mask is red
    # a window preset and a drag change intensities (and the W/L shown)
    body = without[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 0].mean()
    driver.find_element("css selector", ".mh-preset:nth-of-type(1)").click()  # Lung
    lung = pixels(driver, "axial")[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 0].mean()
    assert abs(lung - body) > 20
    wl = driver.find_element("css selector", ".mh-wl").text
    ActionChains(driver).move_to_element(canvas(driver, "axial")).click_and_hold().move_by_offset(
        80, -40
    ).release().perform()
    assert driver.find_element("css selector", ".mh-wl").text != wl
    assert abs(pixels(driver, "axial")[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 0].mean() - lung) > 5
    # the cursor shows the voxel's HU and its RAS position
    i, j = int(xs[0]), int(ys[0])
    ActionChains(driver).move_to_element_with_offset(
        canvas(driver, "axial"), int((i + 0.5) * w / 64 - w / 2), int((j + 0.5) * h / 64 - h / 2)
    ).perform()
    readout = driver.find_element("css selector", ".mh-cursor").text
    ras = study.affine @ [i, j, z, 1]
    assert f"value {int(study.array[i, j, z])} HU" in readout, readout
    shown = re.search(r"RAS \(([-\d.]+), ([-\d.]+), ([-\d.]+)\) mm", readout)
    assert shown and np.allclose([float(v) for v in shown.groups()], ras[:3], atol=0.051), readout
    assert "Lesion mask: lesion" in readout
    # no console error, no request beyond the file itself, no URL in the document
    assert severe(driver) == []
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert not re.search(r"https?://", driver.page_source)


def test_browser_sagittal_acquisition_keeps_its_physical_aspect(driver: Any, tmp_path: Path) -> None:
    study, mask = as_sagittal(*axial_ct())
    path = tmp_path / "report.html"
    path.write_bytes(page_for(study, mask, {}))
    open_page(driver, path)
    sizes = {
        v: driver.execute_script("return [arguments[0].width, arguments[0].height]", canvas(driver, v)) for v in LETTERS
    }
    assert sizes["sagittal"][0] / sizes["sagittal"][1] == pytest.approx(
        48 / 80, abs=0.01
    )  # 64 x 0.75 mm by 32 x 2.5 mm
    assert sizes["axial"][0] == sizes["axial"][1]
    assert driver.find_element("css selector", ".mh-view").get_attribute("data-view") == "sagittal"
    assert severe(driver) == []


def test_browser_a_broken_viewer_is_an_error_not_a_blank(driver: Any, tmp_path: Path) -> None:
    """The console check can fail: data that cannot be inflated logs an error and says so on the page."""
    study, mask = axial_ct()
    page = page_for(study, mask, {}).decode()
    data = viewer_data(page)
    broken = page.replace(
        data["data"]["image"], "data:application/zlib;base64," + base64.b64encode(b"not zlib").decode()
    )
    path = tmp_path / "broken.html"
    path.write_text(broken)
    driver.get_log("browser")
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.getElementById('mh-viewer').dataset.ready") == "0":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert driver.execute_script("return document.getElementById('mh-viewer').dataset.ready") == "error"
    assert "could not start" in driver.find_element("css selector", ".mh-status").text
    assert severe(driver), "the error reached no console"
