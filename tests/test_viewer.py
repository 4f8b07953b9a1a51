"""The viewer in a real headless Chromium (Debian's), driven by Playwright, against a store filled by
the real pipeline. Screenshots go to test-artifacts/."""
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, use_store
from pipeline.config import load_config
from pipeline.stages.continuation import run_stage
from viewer import data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Viewer:
    def __init__(self, uri: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.port", str(self.port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("streamlit did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def filled_store(prepared, tmp_path_factory):
    """A baseline and two adapted arms (LoRA rank 4 and 8) over 3 tiny clips, through the real stages."""
    uri = use_store(tmp_path_factory.mktemp("viewer") / "mlflow.db")
    run_stage(load_config(prepared), "baseline")
    for rank in ("4", "8"):
        run_stage(load_config(prepared, {"adaptation.rank": rank}), "adapt")
    return uri, load_config(prepared)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.goto(url)
    page.wait_for_selector("h1", timeout=60_000)
    return page


def wait_idle(page):
    """Streamlit shows a running indicator while the script reruns."""
    page.wait_for_timeout(300)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)


def test_pairing_and_statistics(filled_store, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    uri, config = filled_store
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = data.list_experiments(client)[0]
    arms = data.list_arms(client, experiment.experiment_id)
    assert sorted(a.stage for a in arms) == ["adapt", "adapt", "baseline"]
    baseline = next(a for a in arms if a.stage == "baseline")
    adapted = [a for a in arms if a.stage == "adapt"]
    rows = data.clip_rows(baseline, adapted)
    assert len(rows) == 3 and {r["class"] for r in rows} <= {"bounce", "orbit", "rotate", "scale"}
    for row in rows:
        assert row["A2 Δpsnr"] == pytest.approx(adapted[1].value(row["clip"], "psnr") - row["baseline psnr"])
        assert math.isnan(row["baseline lpips"])  # no LPIPS weights here: absent, not invented
    stats = data.arm_statistics(rows, 1, "psnr")
    assert stats["n"] == 3 and stats["diff_mean"] == pytest.approx(sum(r["A1 Δpsnr"] for r in rows) / 3)
    curve = data.frame_curve(baseline, [r["clip"] for r in rows], "ssim")
    assert curve["frame"] == list(range(config.data.context, config.data.frames))
    videos = data.download_clip(client, baseline.clips[rows[0]["clip"]], tmp_path)
    assert sorted(videos) == sorted(data.CLIP_ARTIFACTS) and all(p.stat().st_size > 0 for p in videos.values())
    bare = client.create_run(experiment.experiment_id)  # a run with no artifacts at all
    assert data.download_clip(client, client.get_run(bare.info.run_id), tmp_path) is None


def test_viewer_in_browser(filled_store, browser):
    uri, config = filled_store
    viewer = Viewer(uri)
    try:
        page = open_page(browser, viewer.url)
        page.wait_for_selector("video", timeout=120_000)
        wait_idle(page)
        page.screenshot(path=str(SHOTS / "viewer-experiment.png"))
        assert page.get_by_role("combobox", name="Experiment").input_value() == "tiny"
        assert page.get_by_role("combobox", name="Baseline run").input_value().startswith("baseline · 3 clips")
        assert "lora r8 3 steps on context" in page.locator("[data-testid='stSidebar']").text_content()
        page.get_by_role("combobox", name="Adapted runs").click()
        page.get_by_role("option").first.wait_for(timeout=10_000)
        options = page.get_by_role("option").all_text_contents()
        assert any("lora r4 3 steps on context · 3 clips" in o for o in options)  # the other adapted run
        page.keyboard.press("Escape")

        # the composed side-by-side video: every column plays together, one frame per clip frame
        duration = page.evaluate("""async () => { const v = document.querySelector('video');
            if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r));
            return v.duration; }""")
        assert duration > 0 and round(duration * config.data.fps) == config.data.frames

        # the frame slider changes the frames shown
        def frame_images():
            return page.eval_on_selector_all("[data-testid='stImage'] img", "els => els.map(e => e.src)")
        before = frame_images()
        assert len(before) == 4  # context | ground truth | baseline | A1
        slider = page.get_by_role("slider", name="Frame")
        assert slider.input_value() == str(config.data.context)  # it opens on the first generated frame
        slider.focus()
        slider.press("ArrowRight")
        page.get_by_text(f"baseline · frame {config.data.context + 1}").wait_for(timeout=30_000)
        wait_idle(page)
        after = frame_images()
        # the context column holds its last frame after K; every other column shows a new frame
        assert len(after) == 4 and all(a != b for a, b in zip(after[1:], before[1:]))

        # every plot with the right number of points
        traces = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
            el => ({title: (el.layout.title.text || "").replace(/<[^>]+>/g, ""), n: el.data.map(t => (t.x || []).length)}))""")
        points = {t["title"].split(": ", 1)[-1].split(" (")[0]: t["n"] for t in traces}
        clips, horizon = 3, config.data.frames - config.data.context
        assert points["mean ± SE per arm"] == [2]  # baseline and A1
        assert points["adapted − baseline per clip"] == [clips]
        assert points["baseline vs adapted per clip"] == [clips]
        assert points["psnr per frame"] == [2 * horizon, horizon, 2 * horizon, horizon]  # band, line per arm
        assert [t["n"] for t in traces if t["title"].startswith("cost vs gain")] == [[1]]  # one adapted arm
        page.locator(".js-plotly-plot").last.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "viewer-plots.png"))
    finally:
        viewer.stop()


def test_empty_and_unreachable_stores(browser, tmp_path):
    empty = Viewer(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        page = open_page(browser, empty.url)
        page.get_by_text("No experiments yet").wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / "viewer-empty.png"))
    finally:
        empty.stop()
    down = Viewer(f"http://127.0.0.1:{free_port()}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    try:
        page = open_page(browser, down.url)
        page.get_by_text("Cannot read the tracking store").wait_for(timeout=60_000)
        assert "Traceback" not in page.inner_text("body")
        page.screenshot(path=str(SHOTS / "viewer-unreachable.png"))
    finally:
        down.stop()
