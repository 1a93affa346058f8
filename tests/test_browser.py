"""A real browser (Debian's headless Chromium via Playwright) walks a new user through the app on a tiny model: upload
and preview, a named run with its baseline (every loss curve drawn in its colour), a second run stopped midway, a page
reload, resuming it, trying the first run and exporting it. UPDATE_SCREENSHOT=1 saves the page to docs/screenshot.png (otherwise to a
temporary folder, so a test run leaves the tree clean). Skipped where Chromium or Playwright is not installed."""
import os
import shutil
import time

import pytest

import app
from frugal_loraga import jobs
from frugal_loraga.progress import Phase
from conftest import ROOT, free_port

BASELINE = "Also train plain LoRA (QLoRA on a 4-bit base) for comparison"  # the baseline checkbox
CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def steps_at_least(seconds, finetune):
    """finetune whose training steps each take at least `seconds`: a tiny model's 6-step job would otherwise end
    between two of the page's 1 s status polls, before the time left could be seen."""
    def slowed(config, progress, **kwargs):
        def report(phase, done, total, metrics):
            if phase == Phase.TRAINING and done:
                time.sleep(seconds)
            progress(phase, done, total, metrics)
        return finetune(config, progress=report, **kwargs)
    return slowed


def test_a_new_user_trains_resumes_tries_and_exports(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(app, "UPLOADED", tmp_path / "uploads")
    monkeypatch.setattr(app, "MODEL_ROOTS", [tiny_model_dir])
    monkeypatch.setattr(jobs, "finetune", steps_at_least(0.4, jobs.finetune))  # the ETA is on screen for a few polls
    port = free_port()
    ui = app.build_ui()
    ui.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1700})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator("input[type=file]").first.set_input_files(str(sample_path))
            playwright.expect(page.get_by_text("400 examples (alpaca)")).to_be_visible(timeout=30_000)  # on upload
            model = page.get_by_label("Model: 'demo', a local folder, or a hub id")
            model.fill(str(tiny_model_dir))
            model.press("Enter")
            page.get_by_label("4-bit (NF4)").uncheck()
            page.get_by_label("Steps").fill("6")
            page.get_by_label("Estimation samples").fill("4")
            page.get_by_label(BASELINE).check()
            page.get_by_label("Run name (empty: the method and the time)").fill("first")
            page.get_by_role("button", name="Train", exact=True).click()
            playwright.expect(page.get_by_text("left for the whole job")).to_be_visible(timeout=60_000)
            page.get_by_text("Finished.").wait_for(timeout=120_000)
            page.wait_for_timeout(2500)  # one more timer tick draws the final curve
            assert page.get_by_text("Started first.").is_visible()  # the button's answer outlives the status redraws
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.wait_for_timeout(3000)
            assert requests == []  # idle: the status timer stops with the job
            curves = app.JOBS.job.curves
            assert curves["lora_ga"]["train_loss"][-1][0] == curves["lora"]["train_loss"][-1][0] == 6
            lines = page.locator('path[aria-roledescription="line mark"]')
            drawn = {lines.nth(i).get_attribute("aria-label").split("curve: ")[-1]: lines.nth(i)
                     for i in range(lines.count()) if lines.nth(i).get_attribute("d")}
            assert set(drawn) == set(app.CURVE_COLORS), f"drawn curves: {sorted(drawn)}"
            assert all(line.get_attribute("stroke") == app.CURVE_COLORS[name] for name, line in drawn.items())
            assert drawn["lora train"].get_attribute("d").count("L") == 5  # a segment between each of 6 steps
            legend = page.locator('[aria-roledescription="legend"] text').all_text_contents()
            assert set(app.CURVE_COLORS) <= set(legend), legend
            ticks = page.locator('[aria-roledescription="axis"] text').all_text_contents()
            assert "1" in ticks and "1.5" not in ticks  # whole steps on the x axis

            page.get_by_label(BASELINE).uncheck()  # a second run, stopped midway
            page.get_by_label("Steps").fill("60")
            page.get_by_label("Run name (empty: the method and the time)").fill("second")
            page.get_by_role("button", name="Train", exact=True).click()
            page.get_by_text("lora_ga: training").wait_for(timeout=60_000)
            page.get_by_role("button", name="Stop").click()
            page.get_by_text("press Resume").wait_for(timeout=60_000)

            page.reload()  # the runs come back with the page; resume takes their settings
            table = page.get_by_label("Runs in runs/app (the last updated first)")
            for name, status in (("first", "finished"), ("first-lora", "finished"), ("second", "stopped")):
                playwright.expect(table.get_by_role("row").filter(has_text=name).first).to_contain_text(status,
                                                                                       timeout=30_000)
            run = page.get_by_label("Run", exact=True)
            run.click()
            page.get_by_role("option", name="second", exact=True).click()
            page.get_by_role("button", name="Resume").click()
            page.get_by_text("Finished.").wait_for(timeout=120_000)
            assert app.JOBS.job.curves["lora_ga"]["train_loss"][-1][0] == 60

            run.click()
            page.get_by_role("option", name="first", exact=True).click()
            page.get_by_role("button", name="Generate").click()
            playwright.expect(page.get_by_label("With adapter")).not_to_have_value("", timeout=60_000)
            page.get_by_role("button", name="Download adapter (.zip)").click()
            playwright.expect(page.get_by_text("PeftModel.from_pretrained")).to_be_visible(timeout=30_000)
            playwright.expect(page.get_by_role("cell", name="first-adapter.zip")).to_be_visible()
            shot = ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path
            page.screenshot(path=str(shot / "screenshot.png"), full_page=True)
            browser.close()
    finally:
        ui.close()
