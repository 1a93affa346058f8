"""The web app's handlers end to end on a tiny model: upload, preview, start, refuse a second start, plot, try, export."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import torch

import app
from conftest import free_port, write_jsonl
from test_families import save_tiny
from frugal_loraga import jobs
from frugal_loraga.checkpoint import process_identity
from frugal_loraga.eta import JobClock


def form(**settings) -> list:
    """The Train form's values in app.FORM's order: a quick LoRA run on the tiny model unless settings say otherwise."""
    values = dict(upload=None, eval_upload=None, data_format="auto", columns="", chat_template="model", load_in_4bit=False,
                  init="lora", rank=2, alpha=16, use_rslora=True, lr=3e-3, steps=2, batch_size=2, max_length=96,
                  estimation_samples=4, grad_accum=1, schedule="cosine", warmup_ratio=0.03, target_modules="all-linear",
                  seed=0, estimation_batch_size=2, grad_budget_gib="", nf4_error_rank=16, compile=True, baseline=False,
                  run_name="")
    values.update(settings)
    return [values[name] for name in app.FORM]


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, tmp_path_factory, monkeypatch):
    """Runs under tmp_path; files there count as uploaded, and the tests' model folders may be named. Each test has
    its own jobs: none left from another test."""
    monkeypatch.setattr(app, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(app, "UPLOADED", tmp_path / "uploads")
    monkeypatch.setattr(app, "UPLOADS", tmp_path)
    monkeypatch.setattr(app, "MODEL_ROOTS", [tmp_path_factory.getbasetemp()])
    monkeypatch.setattr(app, "JOBS", jobs.Jobs())
    monkeypatch.setattr(app, "LABELS", {})  # as before build_ui: the messages as the package words them


def test_uploads_are_sanitized_size_limited_and_typed(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "..evil name;rm -rf.jsonl", [{"text": "hi"}])
    stored = app.store_upload(str(source), tmp_path / "runs" / "r" / "data")
    assert stored.parent == tmp_path / "runs" / "r" / "data" and stored.name == "evil_name_rm_-rf.jsonl"
    assert app.sanitize_name("../../etc/passwd") == "passwd"
    assert app.sanitize_name("données_été ü.jsonl") == "données_été_ü.jsonl"  # letters of any script stay
    assert app.sanitize_name("donne\u0301es.jsonl") == "donn\u00e9es.jsonl"  # one spelling of each letter (NFC)
    assert app.sanitize_name("...") == "upload.jsonl" and app.sanitize_name("...", "run-1") == "run-1"
    long = app.sanitize_name("字" * 90 + ".jsonl")  # 276 bytes in UTF-8: past what file systems take
    assert long.endswith("字.jsonl") and len(long.encode()) <= app.MAX_NAME_BYTES
    (tmp_path / "x.exe").write_text("x")
    with pytest.raises(app.DataError, match="unsupported file type"):
        app.store_upload(str(tmp_path / "x.exe"), tmp_path / "runs" / "r")
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 2)
    with pytest.raises(app.DataError, match="larger than"):
        app.store_upload(str(source), tmp_path / "runs" / "r")


def test_preview_shows_masked_rows_and_line_numbered_errors(tiny_model_dir, tmp_path):
    text = app.preview(None, "auto", str(tiny_model_dir), 128)
    assert "sample.jsonl" in text and "400 examples (alpaca)" in text and "[[" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    assert "line 2: malformed JSON" in app.preview(str(bad), "auto", str(tiny_model_dir), 128)


def test_memory_estimate_names_the_device(tiny_model_dir):
    text = app.memory_estimate(str(tiny_model_dir), True, 4, 2, 128, "lora_ga")
    assert "Estimated peak" in text and ("GiB" in text) and ("CPU" in text or "GiB" in text)
    assert "Error" in app.memory_estimate("/nonexistent", True, 4, 2, 128, "lora_ga")
    assert "batch_size needs a whole number, got 2.5" in app.memory_estimate(str(tiny_model_dir), True, 4, 2.5, 128,
                                                                               "lora_ga")


def test_memory_estimate_of_a_mixture_of_experts_gives_its_weights(tmp_path):
    """No peak estimate for experts: the weights and adapter, counted on the model's skeleton, as fit_advice words a
    fit; the expert stacks in 16 bits named where they are."""
    folder = str(save_tiny(tmp_path, "mixtral"))
    text = app.memory_estimate(folder, True, 4, 2, 128, "lora_ga")
    assert re.search(r"no estimate of the peak for mixtral \(it covers dense decoders\); its weights and adapter, "
                     r"before any activation: fits \(0\.\d of \d+\.\d GiB", text), text
    text = app.memory_estimate(folder, False, 4, 2, 128, "lora_ga")
    assert re.search(r"its weights \(0\.\d GiB of them mixture-of-experts expert stacks in 16 bits: load_in_4bit is "
                     r"off\) and adapter, before any activation: fits", text), text
    text = app.memory_estimate(folder, True, 4, 2, 128, "lora_ga", 2, "", 16, "gate_proj")  # the form's targets
    assert "no module matches target_modules gate_proj" in text, text


def test_train_with_baseline_plot_try_and_export(tiny_model_dir, monkeypatch, tmp_path):
    args = dict(model=str(tiny_model_dir), init="lora_ga", steps=4, baseline=True)
    assert app.start(*form(**args, run_name="first")) == "Started first."
    assert "already in progress" in app.start(*form(**args, run_name="second"))
    deadline = time.time() + 120
    while app.JOBS.busy() and time.time() < deadline:
        time.sleep(0.2)
    text, frame = app.status()
    assert "Finished" in text, text
    assert re.search(r"\*\*lora_ga\*\*: train loss \d\.\d{4}, eval loss \d\.\d{4}; init \d+ s, training \d+ s \(\d+ "
                     r"tokens/s\), peak \d+\.\d\d GiB; adapter in `.*first/adapter`", text), text
    frame = frame.dropna()
    assert {"lora_ga train", "lora_ga eval", "lora train", "lora eval"} <= set(frame["curve"])
    assert frame[frame.curve == "lora_ga train"]["step"].tolist() == [1, 2, 3, 4]
    runs = app.runs_table()
    assert set(runs["name"]) == {"first", "first-lora"} and set(runs["status"]) == {"finished"}
    assert "a run named first exists" in app.start(*form(**args, run_name="first"))
    allowed = []  # cuDNN's attention allowed, per attention call of the generation
    attention = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *args, **kwargs: allowed.append(
        torch.backends.cuda.cudnn_sdp_enabled()) or attention(*args, **kwargs))
    base, adapted = app.try_prompt("Ada has 2 apples", 5, "first")
    assert base.endswith("[cut at 5 new tokens]") and isinstance(adapted, str)
    assert allowed and not any(allowed)  # each new token is a new length, which cuDNN's attention would plan for
    archive, code = app.export_zip("first-lora")
    assert archive.endswith("first-lora-adapter.zip") and code.startswith("Unzip first-lora-adapter.zip into a folder")
    shutil.unpack_archive(archive, tmp_path / "first-lora-adapter")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code.split("```python\n")[1].split("```")[0], scope)  # the code the page shows, as a user runs it
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
    assert app.try_prompt("x", 5, "")[0].startswith("Train first, or select a run")
    assert app.export_shown("first")[0].visible and not app.export_shown("nothing")[0].visible
    assert app.delete_run("first-lora") == "Deleted first-lora." and list(app.runs_table()["name"]) == ["first"]
    assert app.status()[0] == "**idle**" and app.status()[1]["loss"].isna().all()  # the job that ran it forgotten


def test_status_shows_the_whole_jobs_time_left():
    """The status names the phase and its units, and, while a job runs, the time left for the whole job (eta.py)."""
    clock = JobClock([{"training": 10.0}], rate=1.0)
    clock.update(0, "training", 4, 10)
    job = jobs.Job(thread=threading.Thread(target=time.sleep, args=(2,)), phase="lora: training", done=4, total=10,
                  clock=clock)
    job.thread.start()
    app.JOBS.job = job
    assert app.status()[0].startswith("**lora: training** 4/10, about 6 s left for the whole job.")
    clock.end = time.time() - 5  # past the predicted end: no "0 s left" while it lasts
    assert app.status()[0].startswith("**lora: training** 4/10, taking longer than estimated.")
    job.thread.join()
    assert app.status()[0] == "**lora: training**"  # ended: no units or time left to show


def test_stop_then_resume_from_the_runs_own_folder(tiny_model_dir):
    assert app.start(*form(model=str(tiny_model_dir), steps=200, run_name="long")) == "Started long."
    while app.JOBS.job.phase != "lora: training" and app.JOBS.busy():
        time.sleep(0.05)
    restored = dict(zip(app.FORM, app.running_form()))  # what a page loaded now shows in the form
    assert (restored["steps"], restored["run_name"], restored["baseline"], restored["grad_budget_gib"]) == \
        (200, "long", False, "")
    assert restored["upload"] == gr.update()  # a file box is left as it is
    assert app.JOBS.stop() == "" and "Stop requested" in app.status()[0]  # the status says it, the notice is cleared
    app.JOBS.job.thread.join(60)
    assert "Stopped long; a checkpoint was saved. Select long under Runs and press Resume" in app.status()[0]
    assert app.runs_table().set_index("name").loc["long", "status"] == "stopped"
    assert app.running_form() == [gr.update()] * len(app.FORM)  # no job runs: the form as the user left it
    assert app.resume("long") == "Started long."  # nothing from the form: the settings come from runs/long
    app.JOBS.job.stop.set()
    app.JOBS.job.thread.join(60)
    assert app.JOBS.job.curves["lora"]["train_loss"][0][0] == 1
    assert "select a run under Runs first" in app.resume("nonexistent")


def test_only_uploaded_files_are_read(tmp_path, tiny_model_dir, monkeypatch):
    secret = write_jsonl(tmp_path.parent / "secret.jsonl", [{"text": "the server's secret"}])
    for handler in (lambda: app.preview(str(secret), "auto", str(tiny_model_dir), 128),
                    lambda: app.start(*form(upload=str(secret), model=str(tiny_model_dir))),
                    lambda: app.start(*form(eval_upload=str(secret), model=str(tiny_model_dir)))):
        text = handler()
        assert "only files uploaded through this page can be used" in text and "secret" not in text
    assert not list((tmp_path / "runs").rglob("secret*"))


def test_a_client_cannot_preview_a_server_file(tmp_path, tiny_model_dir, monkeypatch):
    """The attack: a remote client posts a FileData naming a server path it never uploaded. (gradio_client would
    upload its own local copy of such a path first, which on the server's machine looks like a server file read.)"""
    import gradio.utils
    import httpx
    monkeypatch.setattr(app, "UPLOADS", Path(gradio.utils.get_upload_folder()))
    secret = write_jsonl(tmp_path / "secret.jsonl", [{"text": "the server's secret"}])
    port = free_port()
    ui = app.build_ui()
    ui.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/call/preview"
        event = httpx.post(url, json={"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}, "auto",
                                               str(tiny_model_dir), 128]}).json()["event_id"]
        shown = httpx.get(f"{url}/{event}", timeout=60).text
    finally:
        ui.close()
    assert "event: error" in shown and "secret" not in shown
    assert not list((tmp_path / "runs").rglob("secret*"))


def test_model_field_reveals_no_server_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(app, "MODEL_ROOTS", [tiny_model_dir])
    (tmp_path / "exists").mkdir()
    (tmp_path / "sub" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub")  # relative paths shaped like hub ids (org/name) must not slip through
    seen = {app.memory_estimate(path, True, 4, 2, 128, "lora_ga") for path in
            (str(tmp_path / "exists"), str(tmp_path / "missing"), "/etc", "/nonexistent", "../exists", "../missing",
             "../sub", "x/..", "./x")}
    assert len(seen) == 1 and "the page loads 'demo', a hub id (org/name) or a model folder below" in seen.pop()
    assert "Estimated peak" in app.memory_estimate(str(tiny_model_dir), True, 4, 2, 128, "lora_ga")


def test_simultaneous_starts_run_one_job(tiny_model_dir):
    barrier = threading.Barrier(5)
    answers = []

    def press(name):
        barrier.wait()
        answers.append(app.start(*form(model=str(tiny_model_dir), run_name=name)))
    presses = [threading.Thread(target=press, args=(f"run{i}",)) for i in range(5)]
    for thread in presses:
        thread.start()
    for thread in presses:
        thread.join()
    app.JOBS.job.thread.join(120)
    started = [a for a in answers if a.startswith("Started")]
    assert len(started) == 1 and all("already in progress" in a for a in answers if a not in started)


def test_unexpected_errors_reach_the_page(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: 1 / 0)
    assert app.start(*form(model=str(tiny_model_dir), run_name="x")) == "Started x."
    app.JOBS.job.thread.join(60)
    assert "**Error:** the lora run failed unexpectedly (ZeroDivisionError: division by zero)" in app.status()[0]


@pytest.mark.parametrize("field, value, message", [
    ("rank", None, "rank needs a whole number, got None"), ("steps", 2.5, "steps needs a whole number, got 2.5"),
    ("lr", "fast", "lr needs a number, got 'fast'"), ("model", 7, "model needs text, got 7"),
    ("compile", "yes", "compile needs true or false, got 'yes'"), ("columns", "x=y", "columns: 'x=y' is not format_column="),
    ("schedule", "step", "schedule='step' is not one of cosine, linear, constant"),
    ("nf4_error_rank", 1.5, "nf4_error_rank needs a whole number, got 1.5"),
    ("grad_budget_gib", "lots", "grad_budget_gib needs a number, got 'lots'"),
    ("grad_budget_gib", "0", "grad_budget_gib must be positive"),
    ("model", " ", "choose a model: 'demo', a model folder or a hub id")])
def test_a_field_of_the_wrong_kind_is_named_before_anything_runs(tiny_model_dir, field, value, message):
    """What a client may send through the API, too: each refused with the field's name, and nothing written."""
    for handler in (app.start, app.show_command):
        assert message in handler(*form(**{"model": str(tiny_model_dir), field: value}))
    assert not (app.RUNS).exists()


def test_an_error_names_the_field_by_its_label_on_the_page(tiny_model_dir, tmp_path):
    app.build_ui()
    assert app.show_command(*form(model=str(tiny_model_dir), grad_budget_gib="lots")) == (
        "**Error:** grad_budget_gib needs a number, got 'lots' (the field 'Gradient budget (GiB)')")
    questions = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert app.preview(str(questions), "auto", str(tiny_model_dir), 96).endswith(
        "(e.g. prompt=question,completion=answer) (the field 'Column mapping (when auto-detection fails)')")
    (tmp_path / "cells.csv").write_text("prompt,completion\nQ1,A1,extra\n")
    assert app.preview(str(tmp_path / "cells.csv"), "auto", str(tiny_model_dir), 96).endswith(
        "3 cells, but the header has 2 columns; put quotes around cells that hold commas")  # no field to point at
    assert app.show_command(*form(model=str(tiny_model_dir), steps=0)) == "**Error:** steps must be at least 1, got 0"


@pytest.mark.parametrize("typed, budget", [("", None), ("  ", None), ("1.5", 1.5), (2, 2.0)])
def test_an_empty_gradient_budget_is_the_automatic_one(tiny_model_dir, typed, budget):
    """The budget box is text (a Number box sends 0 once shown): empty means the default, a number its value."""
    config = app.form_configs(dict(zip(app.FORM, form(model=str(tiny_model_dir), grad_budget_gib=typed))), "x",
                              stored=False)[0]
    assert config.grad_budget_gib == budget
    assert "Error" not in app.show_command(*form(model=str(tiny_model_dir), grad_budget_gib=typed))


def test_the_memory_estimate_counts_the_correction_rank():
    texts = [app.memory_estimate("demo", True, 4, 2, 128, "lora_ga", 2, "", q) for q in (0, 16)]
    adapter = [float(re.search(r"adapter and optimizer ([\d.]+) GiB", text)[1]) for text in texts]
    assert adapter[1] > adapter[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hint is for runs on the CPU")
def test_on_the_cpu_the_estimate_says_4_bit_is_slower():
    assert "untick 4-bit (NF4) for a quicker run" in app.memory_estimate("demo", True, 4, 2, 128, "lora_ga")
    assert "untick" not in app.memory_estimate("demo", False, 4, 2, 128, "lora_ga")


def test_resume_starts_over_a_run_stopped_before_training(tiny_model_dir, tmp_path):
    """Nothing was saved before training began: Resume runs it again from the start, with its own settings and its
    copy of the uploaded data."""
    upload = write_jsonl(tmp_path / "mine.jsonl", [{"text": f"{i} plus {i} is {2 * i}"} for i in range(40)])
    assert app.start(*form(model=str(tiny_model_dir), init="lora_ga", run_name="early",
                           upload=str(upload))) == "Started early."
    app.JOBS.job.stop.set()  # seen at the estimate's first batch
    app.JOBS.job.thread.join(60)
    assert "Stopped early before training began; nothing was saved. Select early under Runs and press Resume" in \
        app.status()[0]
    assert app.resume("early") == "Started early."
    app.JOBS.job.thread.join(120)
    assert "Finished." in app.status()[0]
    assert app.runs_table().set_index("name").loc["early", "status"] == "finished"
    assert (app.RUNS / "early" / "data" / "mine.jsonl").read_text() == upload.read_text()
    metrics = (app.RUNS / "early" / "metrics.json").read_text()
    assert "has finished its 2 steps" in app.resume("early") and not app.JOBS.busy()
    assert (app.RUNS / "early" / "metrics.json").read_text() == metrics


def test_a_run_refused_before_loading_is_listed_with_its_error_and_can_be_deleted(tiny_model_dir, tmp_path):
    """Its folder holds the copy of the upload: it is listed (failed, with the message), so that it can be deleted."""
    upload = write_jsonl(tmp_path / "mine.jsonl", [{"text": f"{i} plus {i} is {2 * i}"} for i in range(40)])
    assert app.start(*form(model=str(tiny_model_dir), target_modules="q_proj,typo", run_name="typo",
                           upload=str(upload))) == "Started typo."
    app.JOBS.job.thread.join(60)
    assert "no module matches target_modules typo" in app.status()[0]
    row = app.runs_table().set_index("name").loc["typo"]
    assert row["status"] == "failed" and "no module matches target_modules typo" in row["message"]
    assert app.delete_run("typo") == "Deleted typo." and not (app.RUNS / "typo").exists()


def test_data_the_run_cannot_read_is_refused_by_train_itself_and_stale_copies_go(tiny_model_dir, tmp_path):
    """A CSV whose format cannot be told (no column mapping) is refused by Train, naming the field, before anything is
    copied; a folder that a start refused before its record left behind loses its data copies at the next start of
    that name, so the new run reads only its own."""
    app.build_ui()
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    assert app.start(*form(model=str(tiny_model_dir), upload=str(tmp_path / "qa.csv"), run_name="qa")).endswith(
        "(the field 'Column mapping (when auto-detection fails)')")
    assert not app.RUNS.exists() and not app.JOBS.busy()
    stale = app.RUNS / "qa" / "data" / "qa.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("question,answer\nq,a\n")
    upload = write_jsonl(tmp_path / "mine.jsonl", [{"text": f"{i} plus {i} is {2 * i}"} for i in range(40)])
    assert app.start(*form(model=str(tiny_model_dir), upload=str(upload), run_name="qa")) == "Started qa."
    app.JOBS.job.thread.join(120)
    assert "Finished." in app.status()[0]
    assert [p.name for p in (app.RUNS / "qa" / "data").iterdir()] == ["mine.jsonl"]


def test_a_run_this_machine_cannot_run_is_refused_at_start(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(app.torch.cuda, "is_available", lambda: False)
    config = app.form_configs(dict(zip(app.FORM, form(model=str(tiny_model_dir)))), "x", stored=False)[0]
    message = app.JOBS.launch([app.dataclasses.replace(config, optimizer="paged_adamw_8bit")])
    assert message.startswith("**Error:** optimizer=paged_adamw_8bit needs CUDA") and not app.JOBS.busy()


def test_a_run_of_another_live_process_shows_as_running_elsewhere_and_is_left_alone(tmp_path):
    """A run started from the CLI command the page shows writes in the same folder: while its process lives, the
    page neither resumes nor deletes it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "runs" / "cli"
        folder.mkdir(parents=True)
        record = {"config": {"init": "lora", "model": "demo", "steps": 9}, "status": "running", "updated": 0,
                  "pid": other.pid, "host": socket.gethostname(), "process": "another process, same pid"}
        (folder / "run.json").write_text(json.dumps(record))
        assert app.runs_table().set_index("name").loc["cli", "status"] == "interrupted"  # its pid, reused
        (folder / "run.json").write_text(json.dumps({**record, "process": process_identity(other.pid)}))
        assert app.runs_table().set_index("name").loc["cli", "status"] == "running elsewhere"
        for handler in (app.resume, app.delete_run):
            assert f"cli is being run by another process (pid {other.pid}); wait for it" in handler("cli")
        assert folder.exists()
    finally:
        other.kill()
        other.wait()
    assert app.runs_table().set_index("name").loc["cli", "status"] == "interrupted"


def test_the_export_code_of_a_demo_run_finds_the_demo_on_any_machine(tmp_path):
    folder = tmp_path / "runs" / "d"
    (folder / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "adapter" / name).write_text("{}")
    (folder / "run.json").write_text(json.dumps({"config": {"model": "demo", "data": "x"}, "status": "finished"}))
    code = app.export_zip("d")[1]
    assert "from frugal_loraga.models import demo_model_dir\n" in code
    assert "AutoModelForCausalLM.from_pretrained(demo_model_dir()), 'd-adapter')" in code


def test_a_run_whose_process_ended_shows_as_interrupted(tmp_path):
    folder = tmp_path / "runs" / "killed"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"config": {"init": "lora", "model": "demo", "steps": 9}, "status": "running", '
                                     '"updated": 0}')
    assert app.runs_table().set_index("name").loc["killed", "status"] == "interrupted"


def test_the_cli_command_of_the_form_runs_the_same_settings(tiny_model_dir, tmp_path, monkeypatch):
    """The command runs as printed from anywhere: it enters the app's folder (here tmp_path), where python -m finds
    the package without an install, and names paths from there; the uploads by copies, per run name, with sanitized
    names (Gradio's own copies are temporary)."""
    monkeypatch.setattr(app, "ROOT", tmp_path)
    data = write_jsonl(tmp_path / "mine.jsonl", [{"body": f"{i} and {i}"} for i in range(20)])
    held_out = write_jsonl(tmp_path / "held out;.jsonl", [{"body": "a b"}])
    shown = app.show_command(*form(model=str(tiny_model_dir), init="lora_ga", rank=4, lr=3e-5, steps=12,
                                   estimation_samples=8, grad_accum=2, schedule="linear", grad_budget_gib=0.5,
                                   columns="text=body", upload=str(data), eval_upload=str(held_out),
                                   run_name="my run"))
    assert shown.startswith(f"```bash\ncd {tmp_path} && python -m frugal_loraga train --model ") and \
        shown.endswith("\n```")
    for flag in ("--no-load-in-4bit", "--rank 4", "--lr 3e-05", "--steps 12", "--max-length 96",
                 "--estimation-samples 8", "--out runs/my_run", "--data uploads/my_run/mine.jsonl", "--grad-accum 2",
                 "--schedule linear", "--grad-budget-gib 0.5", "--columns text=body",
                 "--eval-data uploads/my_run/held_out_.jsonl"):
        assert flag in shown, flag
    assert (tmp_path / "uploads" / "my_run" / "held_out_.jsonl").read_text() == held_out.read_text()
    assert "--no-progress" not in shown  # the command is run in a terminal, which shows the progress bars
    assert re.search(r"--out runs/lora_ga-\d{8}-\d{6}\b", app.show_command(*form(model=str(tiny_model_dir),
                                                                                 init="lora_ga")))
    shown, name = app.show_command_named(*form(model=str(tiny_model_dir), init="lora_ga"))  # the name filled in
    assert re.fullmatch(r"lora_ga-\d{8}-\d{6}", name) and f"--out runs/{name}\n" in shown
    assert app.show_command_named(*form(model=str(tiny_model_dir), run_name="my run"))[1] == app.gr.update()


def test_the_model_field_is_looked_up_when_left_not_on_every_keystroke():
    ui = app.build_ui()
    model = next(b for b in ui.blocks.values() if getattr(b, "label", "") == "Model: 'demo', a local folder, or a hub id")
    events = {event for fn in ui.fns.values() for block_id, event in fn.targets if block_id == model._id}
    assert events == {"select", "blur"}  # a hub id typed letter by letter would be looked up for each


def test_the_model_list_offers_the_demo_the_model_folders_and_the_cache(tmp_path, monkeypatch):
    for folder in ("b", "a", "not-a-model"):
        (tmp_path / "models" / folder).mkdir(parents=True)
    for folder in ("a", "b"):
        (tmp_path / "models" / folder / "config.json").write_text("{}")
    monkeypatch.setattr(app, "MODEL_ROOTS", [tmp_path / "models"])
    monkeypatch.setattr(app, "cached_model_ids", lambda: ["org/cached"])
    assert app.model_choices() == ["demo", str(tmp_path / "models" / "a"), str(tmp_path / "models" / "b"), "org/cached"]
