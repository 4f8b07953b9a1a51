"""The viewer in a real headless Chromium (Debian's), driven by Playwright, against a store filled by
the real pipeline. Screenshots go to test-artifacts/."""
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, free_port, use_store
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.data.synthetic import MOTION_CLASSES
from pipeline.stages.continuation import Continuer, run_stage, stage_digest
from pipeline.tracking.runs import frame_curve
from viewer import data

MOTION = "last frames' motion continued (no model)"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


SAMPLES = {"sampling.samples": "2"}


@pytest.fixture(scope="module")
def filled_store(prepared, tmp_path_factory):
    """Through the real stages, over 3 tiny clips with 2 samples each: a baseline; adapted arms with
    LoRA rank 8, a sham (adapting on another clip's context) and LoRA rank 4, which fails on the last
    clip; then a baseline with another sampling seed, comparable with none of them."""
    uri = use_store(tmp_path_factory.mktemp("viewer") / "mlflow.db")
    config = load_config(prepared, SAMPLES)
    run_stage(config, "baseline")
    run_stage(load_config(prepared, {**SAMPLES, "adaptation.rank": "8"}), "adapt")
    run_stage(load_config(prepared, {**SAMPLES, "adaptation.data": "other"}), "adapt")
    failing = max(c.clip_id for c in read_manifest(config.data.manifest) if c.split == config.data.split)
    adapt = Continuer.adapt

    def adapt_or_fail(self, clip, seeds, *args):
        if clip.record.clip_id == failing:
            raise RuntimeError("CUDA out of memory (injected)")
        return adapt(self, clip, seeds, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Continuer, "adapt", adapt_or_fail)
        run_stage(config, "adapt")
    seed2 = load_config(prepared, {**SAMPLES, "sampling.seed": "2"})
    run_stage(seed2, "baseline")
    return uri, config, seed2, failing


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


R4, R8, SHAM = "lora r4 3 steps on context", "lora r8 3 steps on context", "lora r4 3 steps on other"


def load_arms(experiment_id: str, config, seed2) -> tuple[data.Arm, data.Arm, dict[str, data.Arm]]:
    """The baseline, the baseline with sampling seed 2, and the adapted arms by label (up to any note)."""
    arms = data.list_arms(experiment_id)
    assert sorted(a.stage for a in arms) == ["adapt"] * 3 + ["baseline"] * 2
    baselines = {a.digest: a for a in arms if a.stage == "baseline"}
    return (baselines[stage_digest(config, "baseline")], baselines[stage_digest(seed2, "baseline")],
            {a.label.split(" (")[0]: a for a in arms if a.stage == "adapt"})


def choose(page, box: str, option: str) -> None:
    """Pick the option of a selectbox that contains `option`, through the box's search field."""
    combobox = page.get_by_role("combobox", name=box)
    combobox.click()
    combobox.fill(option)
    page.get_by_role("option", name=option).click()


def test_pairing_failures_and_references(filled_store, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    uri, config, seed2_config, failing = filled_store
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = data.list_experiments(client)[0]
    baseline, seed2, adapted = load_arms(experiment.experiment_id, config, seed2_config)

    # comparable arms only: made against this baseline, with the same weights
    assert all(data.why_not_comparable(baseline, a) == "" for a in adapted.values())
    assert all(data.why_not_comparable(seed2, a) == "sampling.seed: 2 vs 0" for a in adapted.values())
    other_weights = dataclasses.replace(adapted[R8], weights="0123456789abcdef")
    assert data.why_not_comparable(baseline, other_weights) == "other model weights"

    arms = [adapted[R4], adapted[R8], adapted[SHAM]]
    rows = data.clip_rows(baseline, arms)
    clips = [r["clip"] for r in rows]
    assert len(rows) == 3 and {r["class"] for r in rows} <= set(MOTION_CLASSES)
    for row in rows:
        assert row["A2 Δpsnr"] == pytest.approx(adapted[R8].value(row["clip"], "psnr") - row["baseline psnr"])
        assert row["A3 result"] == "finished"  # the sham's inputs name the clip's frames, then its partner's
        assert row["repeat last psnr"] == baseline.value(row["clip"], "repeat_last_psnr")
        assert math.isnan(row["baseline lpips"])  # no LPIPS weights here: absent, not invented
        assert "VAE recon psnr" not in row  # the tiny model has no VAE
    assert "+" in adapted[SHAM].clips[clips[0]].data.tags["tta.inputs"]

    # the failed clip counts: as a failure, and as no change under intention to treat
    assert sorted(adapted[R4].failed) == [failing] and adapted[R4].failure_rate == pytest.approx(1 / 3)
    failed_row = next(r for r in rows if r["clip"] == failing)
    assert failed_row["A1 result"] == "failed: CUDA out of memory (injected)" and math.isnan(failed_row["A1 psnr"])
    assert data.outcome(failed_row, 1, "psnr") == "no result"
    base = data.baseline_values(baseline, clips, "psnr")
    itt = data.compare(base, data.arm_values(baseline, adapted[R4], clips, "psnr"))
    complete = data.compare(base, data.arm_values(baseline, adapted[R4], clips, "psnr", itt=False))
    finished_deltas = [r["A1 Δpsnr"] for r in rows if r["clip"] != failing]
    assert itt["n"] == 3 and itt["diff_mean"] == pytest.approx(sum(finished_deltas) / 3)
    assert complete["n"] == 2 and complete["diff_mean"] == pytest.approx(sum(finished_deltas) / 2)

    summary = {r["arm"]: r for r in data.summary_rows(baseline, {"A1": adapted[R4], "A2": adapted[R8]}, clips, "psnr")}
    assert list(summary) == ["baseline", "repeat last frame (no model)", MOTION, f"A1: {R4}", f"A2: {R8}"]
    a1 = summary[f"A1: {R4}"]
    assert a1["failed"] == "1 (33%)" and a1["clips"] == "3"
    assert a1[data.ITT_COLUMN].startswith(f"{itt['diff_mean']:+.4f} [")
    assert a1[data.COMPLETE_COLUMN].endswith("(n=2)")
    repeat = summary["repeat last frame (no model)"]
    ref = data.compare(base, data.reference_values(baseline, data.REPEAT_LAST, clips, "psnr"))
    assert repeat["mean ± SE"].startswith(f"{ref['adapted_mean']:.4f} ±")
    one = {r["arm"]: r for r in data.summary_rows(baseline, {"A1": adapted[R4]}, clips[:1], "psnr")}
    assert one[f"A1: {R4}"][data.ITT_COLUMN] == "fewer than 2 paired clips (1): no statistics"
    assert one[f"A1: {R4}"]["t-test p"] == "—"

    # a result made from other frames than the baseline's is not paired
    moved = adapted[R8].clips[clips[0]].info.run_id
    client.set_tag(moved, "tta.inputs", "0123456789abcdef")
    try:
        r8 = load_arms(experiment.experiment_id, config, seed2_config)[2][R8]
        assert data.clip_result(baseline, r8, clips[0]) == "not paired: made from other frames"
        assert sorted(data.arm_values(baseline, r8, clips, "psnr")) == clips[1:]
    finally:
        client.set_tag(moved, "tta.inputs", baseline.clips[clips[0]].data.tags["tta.inputs"])

    curve = frame_curve([baseline.clips[c] for c in clips], "repeat_last_ssim")
    assert curve["frame"] == list(range(config.data.context, config.data.frames))
    videos = data.download_clip(client, baseline.clips[clips[0]], tmp_path)
    assert sorted(videos) == sorted(data.CLIP_ARTIFACTS) and all(p.stat().st_size > 0 for p in videos.values())
    bare = client.create_run(experiment.experiment_id)  # a run with no artifacts at all
    assert data.download_clip(client, client.get_run(bare.info.run_id), tmp_path) is None


def test_viewer_in_browser(filled_store, browser):
    uri, config, seed2, failing = filled_store
    context, horizon = config.data.context, config.data.frames - config.data.context
    viewer = Viewer(uri)
    try:
        page = open_page(browser, viewer.url)
        page.wait_for_selector("video", timeout=120_000)
        wait_idle(page)
        page.screenshot(path=str(SHOTS / "viewer-experiment.png"))
        assert page.get_by_role("combobox", name="Experiment").input_value() == "tiny"
        # it opens on the newest baseline that an adapted arm was made against, not the newest one
        baseline = page.get_by_role("combobox", name="Baseline run")
        assert baseline.input_value().startswith("baseline · 3 clips · 0 failed (0%) · "
                                                 + stage_digest(config, "baseline")[:8])
        sidebar = page.locator("[data-testid='stSidebar']")
        assert f"A1: {R4}" in sidebar.inner_text()
        assert "failed clips: 1 (33% of 3)" in sidebar.inner_text()
        assert "Not comparable" not in sidebar.inner_text()
        page.get_by_role("combobox", name="Adapted runs").click()
        page.get_by_role("option").first.wait_for(timeout=10_000)
        options = page.get_by_role("option").all_text_contents()
        assert any(f"{R8} · 3 clips · 0 failed" in o for o in options)
        assert any(o.startswith(SHAM + " (SHAM") for o in options)
        page.keyboard.press("Escape")

        # the summary: the reference predictor as an arm, the failure and the ITT statistic beside the complete case
        summary = page.locator("[data-testid='stTable']").first
        headers = [h.strip() for h in summary.locator("thead th").all_inner_texts()]
        cells = [dict(zip(headers, (c.strip() for c in r.locator("th, td").all_inner_texts())))
                 for r in summary.locator("tbody tr").all()]
        assert [r["arm"] for r in cells] == ["baseline", "repeat last frame (no model)", MOTION, f"A1: {R4}"]
        assert cells[3]["failed"] == "1 (33%)" and cells[3][data.COMPLETE_COLUMN].endswith("(n=2)")
        assert cells[3][data.ITT_COLUMN].startswith(("+", "-"))

        # the composed side-by-side video: every column plays together, one frame per clip frame
        duration = page.evaluate("""async () => { const v = document.querySelector('video');
            if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r));
            return v.duration; }""")
        assert duration > 0 and round(duration * config.data.fps) == config.data.frames
        assert page.get_by_text("Each arm shows the first of its 2 samples").count() == 1

        # the frame slider changes the frames shown
        def frame_images():
            return page.eval_on_selector_all("[data-testid='stImage'] img", "els => els.map(e => e.src)")
        before = frame_images()
        assert len(before) == 4  # context | ground truth | baseline | A1
        page.get_by_text(f"context · frame {context} · repeat last psnr").wait_for(timeout=10_000)
        slider = page.get_by_role("slider", name="Frame")
        assert slider.input_value() == str(context)  # it opens on the first generated frame
        slider.focus()
        slider.press("ArrowRight")
        page.get_by_text(f"baseline · frame {context + 1}").wait_for(timeout=30_000)
        wait_idle(page)
        after = frame_images()
        # the context column holds its last frame after K; every other column shows a new frame
        assert len(after) == 4 and all(a != b for a, b in zip(after[1:], before[1:]))

        # every plot with the right number of points
        traces = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
            el => ({title: (el.layout.title.text || "").replace(/<[^>]+>/g, ""), x: el.data.map(t => t.x || [])}))""")
        points = {t["title"].split(": ", 1)[-1].split(" (")[0]: [len(x) for x in t["x"]] for t in traces}
        means = next(t["x"][0] for t in traces if "mean ± SE per arm" in t["title"])
        assert means == ["baseline", "repeat last frame (no model)", MOTION, "A1"]
        assert points["adapted − baseline per clip"] == [2]  # the clips A1 finished
        assert points["baseline vs each arm per clip"] == [3, 3, 2]  # repeat last, linear motion, A1
        assert points["psnr per frame"] == [2 * horizon, horizon] * 4  # band and line: baseline, 2 references, A1
        assert [[len(x) for x in t["x"]] for t in traces if t["title"].startswith("cost vs gain")] == [[1]]
        page.locator(".js-plotly-plot").last.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "viewer-plots.png"))

        # the clip A1 failed on: said in words, shown without A1
        choose(page, "Clip", failing)
        page.get_by_text(f"A1 has no result on {failing}: failed: CUDA out of memory (injected)").wait_for(
            timeout=30_000)
        wait_idle(page)
        # context | ground truth | baseline (images can arrive after the rerun ends on a loaded machine)
        page.wait_for_function("document.querySelectorAll(\"[data-testid='stImage'] img\").length === 3",
                               timeout=30_000)
        assert len(frame_images()) == 3

        # a baseline sampled with another seed: no adapted arm is offered, and the sidebar says why
        choose(page, "Baseline run", stage_digest(seed2, "baseline")[:8])
        page.get_by_text("No adapted run was made against this baseline").wait_for(timeout=30_000)
        wait_idle(page)
        text = sidebar.inner_text()
        assert "Not comparable with this baseline" in text
        assert text.count("sampling.seed: 2 vs 0") == 3
        page.screenshot(path=str(SHOTS / "viewer-not-comparable.png"))
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


def test_the_viewer_opens_on_the_latest_evaluation(filled_store):
    """After `evaluate` of the rank-8 arm, the viewer's opening choice is that experiment, its
    baseline and the rank-8 arm (not the newest arm, rank 4); before any evaluation, nothing is forced."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.stages.evaluate import evaluate

    uri, config, _, _ = filled_store
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiments = data.list_experiments(client)
    assert data.opening_choice(data.latest_evaluation(client), experiments)["experiment"] is None
    rank8 = dataclasses.replace(config, adaptation=dataclasses.replace(config.adaptation, rank=8))
    evaluate(rank8)
    arms = data.list_arms(experiments[0].experiment_id)
    baselines, adapted = [a for a in arms if a.stage == "baseline"], [a for a in arms if a.stage == "adapt"]
    opening = data.opening_choice(data.latest_evaluation(client), experiments, baselines, adapted)
    assert experiments[opening["experiment"]].name == config.experiment
    assert baselines[opening["baseline"]].digest == stage_digest(config, "baseline")
    assert [a.label for a in opening["adapted"]] == [R8] and adapted[0].label != R8  # not simply the newest
    started = client.create_run(experiments[0].experiment_id, tags={"tta.kind": "stage", "tta.stage": "adapt",
                                                                     "tta.digest": "0" * 16, "tta.arm": "just started"})
    try:  # an arm with no clip recorded yet is not offered
        assert {a.digest for a in data.list_arms(experiments[0].experiment_id)} == {a.digest for a in arms}
    finally:
        client.delete_run(started.info.run_id)
