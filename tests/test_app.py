"""The web app's handlers end to end on a tiny model: upload, preview, start, refuse a second start, plot, try, export."""
import time

import pytest
import torch

import app
from conftest import write_jsonl


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "RUNS", tmp_path / "runs")


def test_uploads_are_sanitized_size_limited_and_typed(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "..evil name;rm -rf.jsonl", [{"text": "hi"}])
    stored = app.store_upload(str(source))
    assert stored.parent == tmp_path / "runs" / "uploads" and stored.name == "evil_name_rm_-rf.jsonl"
    assert app.sanitize_name("../../etc/passwd") == "passwd"
    (tmp_path / "x.exe").write_text("x")
    with pytest.raises(app.DataError, match="unsupported file type"):
        app.store_upload(str(tmp_path / "x.exe"))
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 2)
    with pytest.raises(app.DataError, match="larger than"):
        app.store_upload(str(source))


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


def test_train_with_baseline_plot_try_and_export(tiny_model_dir, monkeypatch):
    args = [None, "auto", str(tiny_model_dir), False, "lora_ga", 2, 16, True, 3e-3, 4, 2, 96, 4, True]
    assert app.start(*args) == "Started."
    assert "already in progress" in app.start(*args)
    deadline = time.time() + 120
    while app.JOB.busy() and time.time() < deadline:
        time.sleep(0.2)
    text, frame = app.status()
    assert "Finished" in text, text
    frame = frame.dropna()
    assert {"lora_ga train", "lora_ga eval", "lora train", "lora eval"} <= set(frame["curve"])
    assert frame[frame.curve == "lora_ga train"]["step"].tolist() == [1, 2, 3, 4]
    allowed = []  # cuDNN's attention allowed, per attention call of the generation
    attention = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *args, **kwargs: allowed.append(
        torch.backends.cuda.cudnn_sdp_enabled()) or attention(*args, **kwargs))
    base, adapted = app.try_prompt("Ada has 2 apples", max_new_tokens=5)
    assert isinstance(base, str) and isinstance(adapted, str)
    assert allowed and not any(allowed)  # each new token is a new length, which cuDNN's attention would plan for
    archive, code = app.export_zip()
    assert archive.endswith(".zip") and "PeftModel.from_pretrained" in code


def test_eta_comes_from_the_pace_of_the_current_phase(monkeypatch):
    """Compiling, or the phase before, does not count: the ETA is this phase's seconds per unit times the units left,
    and there is none until the phase has done a unit."""
    monkeypatch.setattr(app, "JOB", app.Job(phase="lora_ga: training", done=4, total=10, phase_from=2,
                                            phase_started=time.time() - 10))
    assert "**lora_ga: training** 4/10, ETA 30 s." in app.status()[0]
    app.JOB.done = 2
    assert "ETA" not in app.status()[0]


def test_stop_then_resume(tiny_model_dir):
    args = [None, "auto", str(tiny_model_dir), False, "lora", 2, 16, True, 3e-3, 200, 2, 96, 4, False]
    assert app.start(*args) == "Started."
    while app.JOB.phase != "lora: training" and app.JOB.busy():
        time.sleep(0.05)
    assert app.stop().startswith("Stopping")
    app.JOB.thread.join(60)
    assert "Press Resume" in app.status()[0]
    assert app.resume(*args) == "Started."
    app.JOB.stop.set()
    app.JOB.thread.join(60)
    assert app.JOB.curves["lora"]["train_loss"][0][0] == 1


def test_ui_builds():
    assert app.build_ui() is not None
