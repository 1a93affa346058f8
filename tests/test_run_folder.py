"""What a run writes and keeps: bad settings and out folders refused before the model loads (exit code 2), no file
lost (the user's, or the last checkpoint when the disk fills), resume that compares what was trained on by content,
training that diverges stopped before it exports NaNs, and nothing of the model left in memory when a run ends."""
import dataclasses
import gc
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import save_file

import frugal_loraga.api as api_module
import frugal_loraga.checkpoint as checkpoint_module
from frugal_loraga import Config, ConfigError, DataError, RunError, finetune, replaced
from frugal_loraga.checkpoint import UMASK, atomic_write, checkpoint_path, process_identity, read_record
from frugal_loraga.runs import list_runs, run_config
from frugal_loraga.cli import build_parser, command_line, ctrl_c_stops, join_negative_values, main


def tiny_config(model_dir, data, out, **kw):
    settings = dict(model=str(model_dir), data=str(data), rank=2, steps=2, lr=3e-3, estimation_samples=4,
                    eval_every=1, save_every=1, out=str(out), progress=False)
    return Config(**{**settings, **kw})


def cli(model_dir, data, out, *args):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--steps", "2", "--rank", "2",
                 "--estimation-samples", "4", "--out", str(out), "--no-progress", *args])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the run gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(api_module, "load_base", refuse)


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], r"lr must be a positive finite number \(at most 3.403e\+38\), got inf"),
    (["--lr", "nan"], r"lr must be a positive finite number \(at most 3.403e\+38\), got nan"),
    (["--lr", "-1e-4"], r"lr must be a positive finite number \(at most 3.403e\+38\), got -0.0001"),
    (["--lr", "1e300"], r"lr must be a positive finite number \(at most 3.403e\+38\), got 1e\+300"),  # past fp32
    (["--seed", str(2**70)], r"seed must be a 64-bit integer \(between -2\*\*63 and 2\*\*63 - 1\), got 1180591620717"),
    (["--resume"], r"nothing to resume: .*checkpoint/state.pt does not exist"),
    (["--resume", "--overwrite"], r"resume and overwrite exclude each other"),
    (["--target-modules", "q_proj,nonexistent"], r"no module matches target_modules nonexistent; linear layers here: "),
    (["--rank", "4096"], r"rank 4096 is too large for .*: lora_ga needs 8192 <= \d+; lower rank"),
    (["--optimizer", "paged_adamw_8bit", "--device", "cpu"], r"optimizer=paged_adamw_8bit needs CUDA and this run is "
                                                             r"on cpu; use optimizer=adamw"),
    (["--nf4-error-rank", "5000"], r"nf4_error_rank 5000 is above the rank of every adapted layer \(at most \d+ "
                                   r"here.*lower nf4_error_rank to \d+ or less"),
])
def test_bad_settings_exit_2_before_the_model_loads(tiny_model_dir, sample_path, tmp_path, capsys, no_model_load,
                                                     args, message):
    assert cli(tiny_model_dir, sample_path, tmp_path / "run", *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused input leaves no empty folder behind


def test_the_command_line_of_a_config_builds_the_same_config():
    config = Config(data="my data.jsonl", rank=16, lr=2e-5, use_rslora=False, compile=False,
                    target_modules="q_proj,v_proj", eval_data="held out.jsonl", grad_budget_gib=1.5)
    line = command_line(config)
    assert line.startswith("python -m frugal_loraga train --data 'my data.jsonl' ") and "--no-use-rslora" in line
    args = build_parser().parse_args(join_negative_values(shlex.split(line)[3:]))
    assert Config(**{k: v for k, v in vars(args).items() if k != "command"}) == config
    assert command_line(Config(data="x")) == "python -m frugal_loraga train --data x"
    assert command_line(Config(data="x"), "frugal-loraga") == "frugal-loraga train --data x"  # as the CLI was started


def test_negative_numbers_reach_the_config_as_values():
    assert join_negative_values(["--lr", "-1e-4", "--seed", "-3", "--out", "-x"]) == \
        ["--lr=-1e-4", "--seed=-3", "--out", "-x"]


def test_unwritable_outputs_are_refused_first(tiny_model_dir, sample_path, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert cli(tiny_model_dir, sample_path, a_file) == 2
    assert f"out={a_file} is a file, not a folder" in capsys.readouterr().err
    assert cli(tiny_model_dir, sample_path, a_file / "run") == 2  # under a file: cannot be created
    assert re.search(r"cannot write the run in .*file.txt/run: Not a directory", capsys.readouterr().err)
    assert cli(tiny_model_dir, sample_path, tmp_path / "run", "--metrics-json", str(tmp_path)) == 2
    assert f"metrics_json={tmp_path} is a folder" in capsys.readouterr().err
    assert cli(tiny_model_dir, sample_path, tmp_path / "run2", "--metrics-json", str(a_file / "m.json")) == 2
    assert "cannot write the metrics file in" in capsys.readouterr().err
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "adapter").write_text("mine")
    assert cli(tiny_model_dir, sample_path, tmp_path / "run3") == 2
    assert "adapter is a file, but the run writes a folder there" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and (tmp_path / "run3" / "adapter").read_text() == "mine"


def test_a_finished_run_is_not_replaced_without_overwrite(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False))
    (out / "adapter" / "README.md").write_text("my notes")  # a file the run did not write
    before = checkpoint_path(out).read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run \(.*state.pt\); choose another out folder, or "
                                          r"replace it with overwrite \(--overwrite\)"):  # finished: no resume offered
        finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False, lr=1e-3))
    assert checkpoint_path(out).read_bytes() == before
    second = finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False, lr=1e-3, overwrite=True))
    assert second.metrics["train_loss"] != first.metrics["train_loss"]
    assert (out / "adapter" / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.setattr(api_module, "export_adapter", lambda *a: (_ for _ in ()).throw(RunError("the disk is full")))
    with pytest.raises(RunError):  # an overwrite that fails leaves no file of the run it replaced
        finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False, lr=2e-3, overwrite=True))
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md"]
    assert not (out / "metrics.json").exists() and read_record(out)["status"] == "failed"


def test_resume_compares_paths_resolved_and_data_by_content(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_bytes(sample_path.read_bytes())
    stop = threading.Event()
    finetune(tiny_config(tiny_model_dir, data, tmp_path / "run", steps=4, load_in_4bit=False),
             progress=lambda phase, done, total, metrics: phase == "training" and done == 1 and stop.set(), stop=stop)
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    data.write_text(data.read_text().replace("apples", "pears"))  # other data at the same path
    with pytest.raises(ConfigError, match="other settings or inputs for data; use the same settings and files"):
        finetune(tiny_config(tiny_model_dir, data, "run", steps=4, load_in_4bit=False, resume=True))
    resumed = finetune(tiny_config(tiny_model_dir, "copy.jsonl", "run/", steps=4, load_in_4bit=False, resume=True))
    assert [s for s, _ in resumed.metrics["train_loss"]] == [1, 2, 3, 4]


def test_a_full_disk_keeps_the_last_checkpoint(tiny_model_dir, sample_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save = torch.save
    calls = []

    def fill_up(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if obj["step"] == 2:  # as torch reports a full disk: not an OSError
            f.write(b"half a checkpoint")
            monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                                lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448")
        save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fill_up)
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--save-every", "1") == 1
    err = capsys.readouterr().err
    assert re.search(r"could not write .*state.pt: No space left on device. The last checkpoint \(.*state.pt\) is "
                     r"intact. Free disk space, then resume.", err), err
    assert calls == [0, 1, 2]
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == 1
    assert [p.name for p in checkpoint_path(out).parent.iterdir()] == ["state.pt"]
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--save-every", "1", "--resume") == 0
    first = tmp_path / "first"  # a full disk at the first checkpoint: no resume to offer, a start over
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert cli(tiny_model_dir, sample_path, first, "--no-load-in-4bit") == 1
    assert re.search(r"state.pt: No space left on device. No checkpoint was saved yet. Free disk space, then start the "
                     r"run over with overwrite \(--overwrite; in the app", capsys.readouterr().err)
    monkeypatch.setattr(torch, "save", save)
    assert cli(tiny_model_dir, sample_path, first, "--no-load-in-4bit", "--overwrite") == 0


def test_a_folder_turned_read_only_mid_write_gives_a_run_error(tmp_path, monkeypatch):
    """The failed write's temporary file cannot be removed from a read-only folder either: the error is still the
    write's, as a RunError (which the run's failure handling expects), not the removal's OSError."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(checkpoint_module.Path, "unlink", read_only)
    with pytest.raises(RunError, match=r"could not write .*run.json: Read-only file system. The previous file is "
                                       r"unchanged."):
        atomic_write(tmp_path / "run.json", read_only)


def killed_before_export(out):
    """The run folder as a run killed after its last checkpoint and before its export leaves it."""
    shutil.rmtree(out / "adapter")
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "status": "running"}))


def test_what_a_run_would_replace_or_cannot_read_is_refused(tiny_model_dir, sample_path, tmp_path, capsys, caplog):
    """A metrics file or an adapter the run did not write there is kept; a damaged checkpoint is named, not a
    traceback; a resume that asks for another init is told that the checkpoint's is kept."""
    mine = tmp_path / "mine.json"
    mine.write_text("my numbers")
    assert cli(tiny_model_dir, sample_path, tmp_path / "a", "--metrics-json", str(mine)) == 2
    assert f"metrics_json={mine} exists; choose another path, or replace it with overwrite" in capsys.readouterr().err
    assert mine.read_text() == "my numbers" and not (tmp_path / "a").exists()
    out = tmp_path / "run"
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--init", "lora") == 0
    metrics = (out / "metrics.json").read_text()
    assert torch.load(checkpoint_path(out), weights_only=True)["metrics"]["train_seconds"] > 0
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--init", "lora", "--resume") == 2
    assert re.search(r"the run in .*run has finished its 2 steps \(its adapter is in .*adapter\): nothing to resume",
                     capsys.readouterr().err)
    assert (out / "metrics.json").read_text() == metrics
    shutil.rmtree(out / "checkpoint")
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit") == 2
    assert re.search(r"run holds an adapter \(.*adapter_model.safetensors\) but no checkpoint to resume: the run would "
                     r"replace it; choose another out folder, or replace it with overwrite", capsys.readouterr().err)
    ours = tmp_path / "ours.json"
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--overwrite", "--steps", "4",
               "--estimation-samples", "4", "--nf4-error-rank", "8", "--metrics-json", str(ours)) == 0
    killed_before_export(out)
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--steps", "4", "--resume",
               "--metrics-json", str(mine)) == 2  # a resume replaces only the run's own metrics file
    assert f"metrics_json={mine} exists and is not the metrics file of the run to resume; choose another path, or " \
           "move that file" in capsys.readouterr().err
    assert mine.read_text() == "my numbers"
    ours.write_text("the run's, to be written again")
    with caplog.at_level("WARNING"):
        assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--steps", "4", "--resume",
                   "--estimation-samples", "2", "--metrics-json", str(ours)) == 0
    assert json.loads(ours.read_text())["train_loss"]
    assert re.search(r"resuming .*state.pt with its own init, made with estimation_samples=4: the "
                     r"estimation_samples=2 here differ and would apply to a new run only", caplog.text)
    assert (out / "adapter" / "adapter_model.safetensors").exists()  # the resume exported what the kill cut short
    killed_before_export(out)
    state = checkpoint_path(out)
    state.write_bytes(state.read_bytes()[:1000])
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--steps", "4", "--resume") == 2
    assert re.search(r"cannot resume: .*state.pt does not read as a checkpoint \(.*\); start the run over with "
                     r"overwrite \(--overwrite\) or in a new out folder \(in the app", capsys.readouterr().err)


def test_a_refused_overwrite_leaves_the_run_it_would_replace(tiny_model_dir, sample_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--init", "lora") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli(tiny_model_dir, sample_path, out, "--overwrite", "--target-modules", "typo") == 2
    assert "no module matches target_modules typo" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_overwrite_refused_after_the_model_loads_puts_back_the_run_it_would_replace(tiny_model_dir, sample_path,
                                                                                      tmp_path, capsys):
    """The gradient budget is checked with the model loaded, after the old run's files were set aside: they come back
    as they were. An overwrite killed before its first checkpoint (its set-aside files left behind) is undone by the
    next run in the folder before it decides anything."""
    out = tmp_path / "run"
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--init", "lora") == 0
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--overwrite", "--grad-budget-gib", "1e-9") == 2
    assert "is smaller than what the estimate holds" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    replaced.set_aside(out)  # as a killed overwrite leaves it, with its own record
    (out / "run.json").write_text(json.dumps({**json.loads(before[out / "run.json"]), "status": "running", "pid": 0}))
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--init", "lora") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    def interrupted(*args, **kwargs):  # a second Ctrl-C (or torchrun's first) during the estimate
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api_module, "initial_factors", interrupted)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False, overwrite=True))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_run_that_saved_nothing_starts_over_with_the_same_command(tiny_model_dir, sample_path, tmp_path, capsys):
    """Stopped before training began, the CLI says to run the same command again: it does, without overwrite."""
    out = tmp_path / "run"
    stop = threading.Event()
    stop.set()
    assert finetune(tiny_config(tiny_model_dir, sample_path, out, load_in_4bit=False), stop=stop).stopped
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit") == 0
    assert read_record(out)["status"] == "finished"


def test_files_of_the_names_a_run_writes_are_not_written_over(tiny_model_dir, sample_path, tmp_path, capsys,
                                                              no_model_load):
    """A folder of the user's files named as a run's (no run record among them) is refused without overwrite; a metrics
    file that is the data or one of the run's files is refused, overwrite or not."""
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    for name in ("run.json", "metrics.json", "adapter/adapter_config.json"):
        (out / name).write_text("my own")
    assert cli(tiny_model_dir, sample_path, out) == 2
    assert re.search(r"mine holds run.json, metrics.json, adapter/adapter_config.json, which this run would write "
                     r"over; choose another out folder, or replace them with overwrite", capsys.readouterr().err)
    data = tmp_path / "data.jsonl"
    data.write_bytes(sample_path.read_bytes())
    for metrics in (data, tmp_path / "new" / "adapter" / "adapter_model.safetensors", tmp_path / "new" / "run.json"):
        assert cli(tiny_model_dir, data, tmp_path / "new", "--metrics-json", str(metrics), "--overwrite") == 2
        assert "is a file the run reads or writes" in capsys.readouterr().err
    assert data.read_bytes() == sample_path.read_bytes()
    assert all((out / name).read_text() == "my own"
               for name in ("run.json", "metrics.json", "adapter/adapter_config.json"))


def test_the_first_ctrl_c_sets_stop_the_second_interrupts_and_the_handler_is_put_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_stops() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.wait(5)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the second Ctrl-C raises here
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_stops_the_run_with_a_checkpoint_and_says_how_to_continue(tiny_model_dir, sample_path, tmp_path):
    """The first Ctrl-C is the app's Stop: after the current step, a checkpoint and the adapter so far kept, exit
    130 and the command that resumes."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "frugal_loraga", "train", "--model", str(tiny_model_dir), "--data",
               str(sample_path), "--out", str(out), "--steps", "500", "--rank", "2", "--init", "lora",
               "--no-load-in-4bit", "--no-progress", "--save-every", "0", "--eval-every", "1000"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not checkpoint_path(out).exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    time.sleep(1)  # into training
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 130, err
    match = re.search(r"stopped after step (\d+) of 500; the checkpoint is in .*run/checkpoint and the adapter so far "
                      r"in .*adapter. Continue with:\n  (python -m frugal_loraga train .*)", err)
    assert match, err
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == int(match[1]) > 0
    assert read_record(out)["status"] == "stopped" and (out / "adapter" / "adapter_model.safetensors").exists()
    assert "--resume" in shlex.split(match[2]) and "--overwrite" not in shlex.split(match[2])


def test_training_that_diverges_stops_before_exporting_nans(tiny_model_dir, sample_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_model_dir, sample_path, out, "--no-load-in-4bit", "--lr", "1e30", "--steps", "4",
               "--init", "lora") == 1
    assert re.search(r"training diverged at step \d \((loss|gradient norm) (nan|inf)\): lr=1e\+30 is too high for this "
                     r"run; lower lr and start again with overwrite \(--overwrite\) or another out folder. The "
                     r"checkpoint of step \d is kept; no adapter was exported",
                     capsys.readouterr().err)
    assert not (out / "adapter").exists()
    adapter = torch.load(checkpoint_path(out), weights_only=True)["adapter"]
    assert all(torch.isfinite(t).all() for layer in adapter.values() for t in layer.values())


def four_bit_weights_alive() -> int:
    return sum(type(o) is bnb.nn.Params4bit for o in gc.get_objects())


@pytest.mark.parametrize("ending", ["finished", "stopped", "failed"])
def test_nothing_of_the_model_outlives_the_run_with_gc_off(tiny_model_dir, sample_path, tmp_path, monkeypatch, ending):
    """bitsandbytes' 4-bit weights point back at their layer, a reference cycle that only the cyclic collector
    frees: on an 8 GB card a second run in the same process (the app) then found the first one's model still there."""
    stop = threading.Event()
    stop.set()
    if ending == "failed":
        monkeypatch.setattr(api_module, "export_adapter", lambda *a: (_ for _ in ()).throw(RunError("disk")))
    gc.collect()
    assert four_bit_weights_alive() == 0
    gc.disable()
    try:
        config = tiny_config(tiny_model_dir, sample_path, tmp_path / "run", steps=3)
        if ending == "failed":
            with pytest.raises(RunError):
                finetune(config)
        else:
            assert finetune(config, stop=stop if ending == "stopped" else None).stopped == (ending == "stopped")
        assert four_bit_weights_alive() == 0
    finally:
        gc.enable()


def test_the_record_names_files_by_absolute_paths(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    """A CLI run given relative paths in a terminal is resumed by the app, which runs in another folder."""
    shutil.copy(sample_path, tmp_path / "data.jsonl")
    monkeypatch.chdir(tmp_path)
    stop = threading.Event()
    finetune(tiny_config(tiny_model_dir, "data.jsonl", "run", load_in_4bit=False), stop=stop,
             progress=lambda phase, done, total, metrics: phase == "training" and done == 1 and stop.set())
    config = run_config(tmp_path / "run")
    assert (config.data, config.out, config.model) == (str(tmp_path / "data.jsonl"), str(tmp_path / "run"),
                                                       str(tiny_model_dir))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    del record["config"]["quantize_experts"]  # a run recorded before the field: its experts loaded in 16 bits
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    assert run_config(tmp_path / "run").quantize_experts is False
    state = torch.load(checkpoint_path(config.out), weights_only=True)
    del state["config"]["quantize_experts"]
    torch.save(state, checkpoint_path(config.out))
    with pytest.raises(ConfigError, match="it was written with other settings or inputs for quantize_experts"):
        finetune(dataclasses.replace(config, resume=True, quantize_experts=True))


def test_a_run_another_live_process_runs_is_not_resumed_or_replaced(tiny_model_dir, sample_path, tmp_path, capsys,
                                                                       no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"config": {}, "status": "running", "updated": 0, "host": socket.gethostname(), "pid": other.pid,
                  "process": process_identity(other.pid)}
        (out / "run.json").write_text(json.dumps(record))
        for flag in ("--resume", "--overwrite"):
            assert cli(tiny_model_dir, sample_path, out, flag) == 2
            assert f"run is being run by another process (pid {other.pid}); wait for it" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    assert json.loads((out / "run.json").read_text()) == record


def test_each_run_keeps_a_record_that_lists_and_resumes_it(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    stop = threading.Event()
    finetune(tiny_config(tiny_model_dir, sample_path, root / "stopped", steps=3, load_in_4bit=False),
             progress=lambda phase, done, total, metrics: phase == "training" and done == 1 and stop.set(), stop=stop)
    finetune(tiny_config(tiny_model_dir, sample_path, root / "finished", load_in_4bit=False))
    monkeypatch.setattr(api_module, "export_adapter", lambda *a: (_ for _ in ()).throw(RunError("the disk is full")))
    with pytest.raises(RunError):
        finetune(tiny_config(tiny_model_dir, sample_path, root / "failed", load_in_4bit=False))
    with pytest.raises(DataError):  # a bad data file is refused before the run has a record: none is written
        finetune(tiny_config(tiny_model_dir, tmp_path / "missing.jsonl", root / "refused"))
    rows = {row["name"]: row for row in list_runs(root)}
    assert set(rows) == {"stopped", "finished", "failed"}
    assert (rows["stopped"]["status"], rows["stopped"]["steps"], rows["stopped"]["adapter"]) == ("stopped", "1/3", True)
    assert (rows["finished"]["status"], rows["finished"]["steps"]) == ("finished", "2/2")
    assert rows["finished"]["eval_loss"] == json.loads((root / "finished" / "metrics.json").read_text())["eval_loss"][-1][1]
    assert (rows["failed"]["status"], rows["failed"]["message"]) == ("failed", "the disk is full")
    assert [row["name"] for row in list_runs(root)][:1] == ["failed"]  # the last updated first
    live = {row["name"]: row for row in list_runs(root, live={"stopped": {"train_loss": [[1, 0.5], [2, 0.25]]}})}
    assert (live["stopped"]["steps"], live["stopped"]["train_loss"]) == ("2/3", 0.25)  # a running job's metrics so far
    assert live["finished"] == rows["finished"]
    monkeypatch.undo()
    config = run_config(root / "stopped")  # the settings from the folder alone, as after an app restart
    assert config.steps == 3 and config.lr == 3e-3 and config.estimation_samples == 4
    monkeypatch.chdir(tmp_path / "runs" / "stopped")  # elsewhere: the record's paths are absolute
    resumed = finetune(dataclasses.replace(config, resume=True))
    assert [s for s, _ in resumed.metrics["train_loss"]] == [1, 2, 3]
    assert read_record(root / "stopped")["status"] == "finished"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_have_the_mode_open_gives(tmp_path, monkeypatch, mask, mode):
    """safetensors makes its files private (0600): the adapter a run writes is readable as its other files are, by
    the process's umask (read once: checkpoint.UMASK, the real one below)."""
    monkeypatch.setattr(checkpoint_module, "UMASK", mask)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    atomic_write(path, lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    assert stat.S_IMODE(path.stat().st_mode) == mode and not list(path.parent.glob("*.tmp"))
    made = tmp_path / "made"
    made.touch()
    assert stat.S_IMODE(made.stat().st_mode) == 0o666 & ~checkpoint_module.file_mode_mask() == 0o666 & ~UMASK


def test_bad_data_is_refused_before_the_model_is_looked_for(tmp_path, monkeypatch):
    """The demo's first use converts its weights (half a minute): a data file's errors come first."""
    def look_for(*args):
        raise AssertionError("the model was looked for before the data was read")
    monkeypatch.setattr(api_module, "resolve_model_path", look_for)
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        finetune(Config(data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "run"), progress=False))
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match="cannot tell the format from the columns"):
        finetune(Config(data=str(tmp_path / "qa.csv"), out=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()
