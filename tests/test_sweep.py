"""Sweeps end to end on the tiny model: a 2x2 grid through the CLI (its ranked table, its record, the
viewer's sweep view and MLflow's compare view of two of its arms, both in headless Chromium), and a
grid over a SLURM job array, whose rendered scripts run here as SLURM would run its tasks."""
import json
import os
import subprocess
import urllib.parse
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli, mlflow_server, use_store, write_config
from pipeline.config import load_config
from pipeline.stages.continuation import stage_digest
from test_cluster import server  # noqa: F401 (a fixture)
from test_viewer import SHOTS, Viewer, browser, open_page, wait_idle  # noqa: F401 (browser: a fixture)

GRID = ("--grid", "adaptation.rank=2,4", "--grid", "adaptation.lr=1e-3,2e-3")
ARMS = sorted(f"lora-r{r}-lr{lr}-3steps" for r in (2, 4) for lr in ("0.001", "0.002"))


def stage_runs(experiment_id: str, stage: str | None = None) -> list:
    where = "tags.`tta.kind` = 'stage'" + (f" and tags.`tta.stage` = '{stage}'" if stage else "")
    return MlflowClient().search_runs([experiment_id], where)


def open_view(browser, url: str, heading: str, plots: int):
    """The viewer's page once the view under `heading` has drawn its `plots` figures."""
    page = open_page(browser, url)
    page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {plots}", timeout=60_000)
    wait_idle(page)
    return page


def table_rows(page) -> list[dict[str, str]]:
    """The first table on the page, a dict per row by column header."""
    table = page.locator("[data-testid='stTable']").first
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    return [dict(zip(headers, (c.strip() for c in r.locator("th, td").all_inner_texts())))
            for r in table.locator("tbody tr").all()]


def plots_by_title(page) -> dict[str, dict]:
    """Every Plotly figure on the page by title: its traces' x and y."""
    plots = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
        el => ({title: (el.layout.title.text || "").replace(/<[^>]+>/g, ""), x: el.data.map(t => t.x),
               y: el.data.map(t => t.y)}))""")
    return {p["title"]: p for p in plots}


@pytest.fixture(scope="module")
def swept(prepared, tmp_path_factory):
    """`sweep --grid adaptation.rank=2,4 --grid adaptation.lr=1e-3,2e-3` over the 3 tiny clips, in a store of its own."""
    base = tmp_path_factory.mktemp("sweep")
    uri = use_store(base / "mlflow.db")
    result = subprocess.run(cli("sweep", "--config", str(prepared), *GRID), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, mlflow.get_experiment_by_name(load_config(prepared).experiment).experiment_id, result.stdout


def test_a_2x2_sweep_runs_every_arm_against_one_baseline(swept, prepared):
    """One baseline, four adapted arms, each evaluated, all nested in the sweep's run, whose record names
    every arm; the last table ranks them by their paired gain."""
    uri, experiment_id, stdout = swept
    mlflow.set_tracking_uri(uri)
    runs = stage_runs(experiment_id)
    assert sorted(r.data.tags["tta.stage"] for r in runs) == ["adapt"] * 4 + ["baseline"] + ["evaluate"] * 4 + ["sweep"]
    sweep = next(r for r in runs if r.data.tags["tta.stage"] == "sweep")
    assert sweep.info.status == "FINISHED"
    assert sweep.info.run_name == "sweep adaptation.rank=2,4 adaptation.lr=1e-3,2e-3"
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in runs if r is not sweep)
    table = stdout[stdout.index("sweep: 4 arms"):].splitlines()[2:]
    assert sorted(line.split()[0] for line in table) == ARMS
    gains = [float(line.split()[2]) for line in table]
    assert gains == sorted(gains, reverse=True)
    record = json.loads(Path(MlflowClient().download_artifacts(sweep.info.run_id, "sweep.json")).read_text())
    assert record["grid"] == {"adaptation.rank": ["2", "4"], "adaptation.lr": ["1e-3", "2e-3"]}
    assert [a["arm"] for a in record["arms"]] == [line.split()[0] for line in table]
    digests = {stage_digest(load_config(prepared, a["point"]), "adapt") for a in record["arms"]}
    assert {a["digest"] for a in record["arms"]} == digests == {r.data.tags["tta.digest"] for r in runs
                                                                 if r.data.tags["tta.stage"] == "adapt"}


def test_the_viewer_opens_on_the_sweep_with_every_arm(swept, browser):  # noqa: F811
    uri, experiment_id, _ = swept
    mlflow.set_tracking_uri(uri)
    gains = {r.info.run_name: r.data.metrics["eval.psnr_gain"] for r in stage_runs(experiment_id, "adapt")}
    viewer = Viewer(uri)
    try:
        page = open_view(browser, viewer.url, "Sweep", plots=3)
        rows = table_rows(page)
        assert [r["arm"] for r in rows] == sorted(gains, key=gains.get, reverse=True)  # best first
        assert all(float(r["Δpsnr (ITT)"]) == pytest.approx(gains[r["arm"]], abs=1e-3) for r in rows)
        assert {(r["adaptation.rank"], r["adaptation.lr"]) for r in rows} == {
            (rank, lr) for rank in ("2", "4") for lr in ("1e-3", "2e-3")}
        by_title = plots_by_title(page)
        page.screenshot(path=str(SHOTS / "viewer-sweep.png"), full_page=True)
        assert len(by_title) == 3, list(by_title)
        cost = by_title["cost vs gain per adapted arm: mean Δpsnr (ITT)"]  # gain against adaptation seconds
        assert sorted(cost["y"][0]) == pytest.approx(sorted(gains.values())) and all(x > 0 for x in cost["x"][0])
        assert "sweep: Δpsnr (ITT, 95% CI) against adaptation.rank" in by_title, list(by_title)
        rank = by_title["sweep: Δpsnr (ITT, 95% CI) against adaptation.rank"]
        assert rank["x"] == [["2", "4"], ["2", "4"]]  # one line per learning rate, the ranks in order
        assert sorted(y for ys in rank["y"] for y in ys) == pytest.approx(sorted(gains.values()))
        assert by_title["sweep: Δpsnr (ITT, 95% CI) against adaptation.lr"]["x"] == [["1e-3", "2e-3"]] * 2
    finally:
        viewer.stop()


def test_mlflow_compare_view_shows_two_arms_figures_and_differing_params(swept, browser, tmp_path):  # noqa: F811
    """MLflow's own UI (a real `mlflow server` over the sweep's store): the compare page of two arms'
    stage runs lists their eval.* figures and the settings in which they differ."""
    uri, experiment_id, _ = swept
    mlflow.set_tracking_uri(uri)
    arms = {r.info.run_name: r for r in stage_runs(experiment_id, "adapt")}
    a, b = arms["lora-r2-lr0.001-3steps"], arms["lora-r4-lr0.002-3steps"]
    with mlflow_server(uri, tmp_path / "artifacts") as server_uri:
        runs = urllib.parse.quote(json.dumps([a.info.run_id, b.info.run_id]))
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.goto(f"{server_uri}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
        page.get_by_text("eval.psnr_gain", exact=True).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        page.get_by_text("Show diff only").first.click()  # of the parameters: those the two runs differ in
        page.wait_for_function("!document.body.innerText.includes('adaptation.alpha')", timeout=30_000)
        differing = page.inner_text("body")
        page.screenshot(path=str(SHOTS / "mlflow-compare.png"), full_page=True)
    assert "adaptation.rank" in differing and "adaptation.lr" in differing and "adaptation.steps" not in differing
    for name in ("eval.psnr_mean", "eval.psnr_gain", "eval.psnr_gain_ci_low", "eval.clips_failed",
                 "adaptation.rank", "adaptation.lr"):
        assert name in text, name
    assert a.info.run_name in text and b.info.run_name in text
    gain = a.data.metrics["eval.psnr_gain"]
    assert any(f"{gain:.{digits}f}" in text for digits in (2, 3, 4, 5))  # the value itself, however MLflow rounds it


def test_a_sweep_over_slurm_runs_one_array_then_evaluates_every_arm(server, prepared, tmp_path):  # noqa: F811
    """`sweep --slurm --tasks 2` renders one array over the baseline and 2 arms x 2 shards and a job that
    depends on it; some of its tasks, then the job, run here as their scripts against a real mlflow server,
    and the job completes what the array left before it evaluates."""
    mlflow.set_tracking_uri(server)
    settings = yaml.safe_load(Path(prepared).read_text())
    settings["experiment"] = "slurm-sweep"
    config = write_config(tmp_path / "sweep.yaml", settings)
    rendered = subprocess.run(cli("sweep", "--config", str(config), "--grid", "adaptation.rank=2,4", "--slurm",
                                  "--tasks", "2", "--tracking-uri", server, "--scratch", str(tmp_path / "scratch"),
                                  "--dry-run"), cwd=ROOT, check=True, capture_output=True, text=True).stdout
    array, final = ROOT / "slurm" / "rendered" / "tta-sweep.sbatch", ROOT / "slurm" / "rendered" / "tta-sweep-evaluate.sbatch"
    assert "#SBATCH --array=0-5" in array.read_text() and "--array" not in final.read_text()
    assert f"sbatch --dependency=afterany:${{job%%;*}} {final}" in rendered
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_COUNT": "6",
           "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    # tasks side by side, as a cluster runs them; tasks 3 and 4 (arm 1's shard 1, arm 2's shard 0) never ran
    tasks = [subprocess.Popen(["bash", str(array)], cwd=ROOT, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in (0, 1, 2, 5)]
    for task in tasks:
        assert task.wait(timeout=300) == 0, task.stderr.read().decode()[-2000:]
    experiment_id = mlflow.get_experiment_by_name("slurm-sweep").experiment_id
    shards = sorted((r.data.tags["tta.stage"], r.data.tags["tta.shard"], r.data.params["adaptation.rank"])
                    for r in stage_runs(experiment_id))
    assert shards == [("adapt", "0/2", "2"), ("adapt", "1/2", "4"), ("baseline", "0/2", "2"), ("baseline", "1/2", "2")]
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
    result = subprocess.run(["bash", str(final)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 arms against one baseline" in result.stdout
    for done in (2, 1):  # arm 1's shard 0 (2 clips) and arm 2's shard 1 (1 clip) came from the array
        assert f"[adapt] resuming: {done} of 3 clips already finished" in result.stdout
    assert "[baseline] nothing to do" in result.stdout
    runs = stage_runs(experiment_id)
    # the two arms' shards the array left undone, completed by the last job, which then evaluates each arm
    assert sorted(r.data.tags["tta.stage"] for r in runs) == ["adapt"] * 4 + ["baseline"] * 2 + ["evaluate"] * 2 + [
        "sweep"]
    clips = MlflowClient().search_runs([experiment_id], "tags.`tta.kind` = 'clip'")
    assert len(clips) == 9 and {r.info.status for r in clips} == {"FINISHED"}  # 3 clips x (baseline + 2 arms)
    evaluated = [r for r in stage_runs(experiment_id, "adapt") if "eval.psnr_gain" in r.data.metrics]
    assert len(evaluated) == 2 and all(r.data.metrics["eval.clips_failed"] == 0 for r in evaluated)


@pytest.fixture(scope="module")
def stepped(prepared, tmp_path_factory):
    """`adapt --set adaptation.eval_at=0,1` (3 steps) and its evaluate over the 3 tiny clips, in a store of its own."""
    uri = use_store(tmp_path_factory.mktemp("steps") / "mlflow.db")
    for stage in ("baseline", "adapt", "evaluate"):
        result = subprocess.run(cli(stage, "--config", str(prepared), "--set", "adaptation.eval_at=0,1"), cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    return uri, mlflow.get_experiment_by_name(load_config(prepared).experiment).experiment_id, result.stdout


def test_the_viewer_shows_the_step_curve_of_one_adaptation(stepped, browser):  # noqa: F811
    """evaluate prints the step curve of eval_at; the viewer opens on it: one row per number of steps,
    the gain against adaptation.steps and against the adaptation's seconds per clip."""
    uri, experiment_id, stdout = stepped
    assert "step curve (adaptation.eval_at)" in stdout
    mlflow.set_tracking_uri(uri)
    gains = {r.info.run_name: r.data.metrics["eval.psnr_gain"] for r in stage_runs(experiment_id, "adapt")}
    assert sorted(gains) == [f"lora-r4-lr0.001-{s}steps" for s in (0, 1, 3)] and gains["lora-r4-lr0.001-0steps"] == 0
    viewer = Viewer(uri)
    try:
        page = open_view(browser, viewer.url, "Step curve", plots=2)
        rows = table_rows(page)
        assert sorted(r["adaptation.steps"] for r in rows) == ["0", "1", "3"]
        by_title = plots_by_title(page)
        page.screenshot(path=str(SHOTS / "viewer-step-curve.png"), full_page=True)
        curve = by_title["step curve: Δpsnr (ITT, 95% CI) against adaptation.steps"]
        assert curve["x"] == [["0", "1", "3"]]
        assert curve["y"][0] == pytest.approx([gains[f"lora-r4-lr0.001-{s}steps"] for s in (0, 1, 3)])
        assert "cost vs gain per adapted arm: mean Δpsnr (ITT)" in by_title
    finally:
        viewer.stop()
