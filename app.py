"""The local web app: upload data, configure, initialise with LoRA-GA, train, watch, try, download.

python app.py [--host 127.0.0.1] [--port 7860] [--share]   (binds 127.0.0.1, no public link unless asked)
The page runs the same finetune(Config) as the API and CLI, one job at a time in a background thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import time
import unicodedata
from pathlib import Path
from typing import get_type_hints

import gradio as gr
import gradio.utils
from huggingface_hub.utils import HFValidationError, validate_repo_id
import pandas as pd
import torch

from frugal_loraga import Config, ConfigError, DataError
from frugal_loraga.config import DEFAULT_LR, KINDS, field_type
from frugal_loraga.blocks import keep_compiled_graphs
from frugal_loraga.checkpoint import check_not_running_elsewhere, has_adapter, read_record
from frugal_loraga.cli import command_line
from frugal_loraga.export import peft_load_fix
from frugal_loraga.api import check_data
from frugal_loraga.data import IGNORE, load_examples
from frugal_loraga.jobs import BUSY, Jobs
from frugal_loraga.memory import card, decoder_shapes, estimate_memory_gib, fit_advice, weights_advice
from frugal_loraga.models import cached_model_ids, load_tokenizer, resolve_model_path
from frugal_loraga.runs import list_runs, resume_config, run_config

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "data" / "sample.jsonl"
RUNS = ROOT / "runs" / "app"
UPLOADED = ROOT / "runs" / "uploads"  # copies of uploads for the CLI commands, by run name (a run copies its own)
UPLOADS = Path(gradio.utils.get_upload_folder())  # where Gradio puts what the page uploads
MODEL_ROOTS = [ROOT / "models"]  # local model folders the page may name: below these (python app.py --models-dir)
MAX_UPLOAD_BYTES = 50 * 2**20
HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}  # the CLI's --help texts, as field tips
ALLOWED = {".jsonl", ".json", ".csv", ".txt"}
SETTINGS = ["data_format", "columns", "chat_template", "model", "load_in_4bit", "init", "rank", "alpha", "use_rslora",
            "lr", "steps", "batch_size", "max_length", "estimation_samples", "grad_accum", "schedule", "warmup_ratio",
            "target_modules", "seed", "estimation_batch_size", "grad_budget_gib", "nf4_error_rank",
            "compile"]  # Config fields on the form
FORM = ["upload", "eval_upload", *SETTINGS, "baseline", "run_name"]  # the Train form, in the order handlers take it
JOBS = Jobs()  # the page's one job at a time, and its Try model
LABELS: dict[str, str] = {}  # Config setting -> its field's label on the page (build_ui fills it)
MENTIONS = {"columns": r"\bwith columns\b"}  # how a message names a setting whose name is a word of its own


def error_text(error: Exception) -> str:
    """An error as the page shows it: with the label, on the page, of the first setting it names by its Config name
    (the CLI's), so that a newcomer finds the field."""
    text = str(error)
    named = [(match.start(), name) for name in LABELS if (match := re.search(MENTIONS.get(name, rf"\b{name}\b"), text))]
    return f"**Error:** {text}" + (f" (the field '{LABELS[min(named)[1]]}')" if named else "")


MAX_NAME_BYTES = 100  # of a sanitized name in UTF-8: well below file systems' 255


def sanitize_name(name: str, fallback: str = "upload.jsonl") -> str:
    """A bare file name of letters and digits (of any script), '.', '_' and '-', no path and no leading dot, at most
    MAX_NAME_BYTES (its stem cut, its suffix kept); the fallback where nothing is left."""
    clean = re.sub(r"[^\w.-]", "_", unicodedata.normalize("NFC", Path(name).name)).lstrip(".")
    suffix = Path(clean).suffix if len(Path(clean).suffix.encode()) < MAX_NAME_BYTES // 2 else ""
    stem = clean[:len(clean) - len(suffix)].encode()[:MAX_NAME_BYTES - len(suffix.encode())].decode(errors="ignore")
    return stem + suffix if stem else fallback


def uploaded(path: str | None) -> Path:
    """A file uploaded through this page, checked (type, size); the sample when nothing is uploaded. A path the page
    did not upload (a client can send any) is refused: the app reads no other file."""
    if not path:
        return SAMPLE
    source = Path(path).resolve()
    if not source.is_relative_to(UPLOADS.resolve()) or not source.is_file():
        raise DataError("only files uploaded through this page can be used; upload the data file again")
    if source.suffix.lower() not in ALLOWED:
        raise DataError(f"{source.name}: unsupported file type; upload .jsonl, .json, .csv or .txt")
    if source.stat().st_size > MAX_UPLOAD_BYTES:
        raise DataError(f"{source.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    return source


def store_upload(path: str | None, folder: Path) -> Path:
    """A copy of an uploaded file (uploaded) in `folder`, with a sanitized name; the sample when nothing is uploaded."""
    source = uploaded(path)
    if source == SAMPLE:
        return SAMPLE
    target = folder / sanitize_name(source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def is_hub_id(name: str) -> bool:
    """A valid Hugging Face repo id (org/name) that names no path here, relative ('../x') or not."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name and ".." not in name.split("/") and not Path(name).exists()


def checked_model(model: str) -> str:
    """The model field's value if the page may use it: 'demo', a hub id, or a folder below MODEL_ROOTS. Any other
    path gets the same message whether or not it exists, so the page reveals nothing of the server's folders."""
    model = model.strip()
    if not model:
        raise ConfigError("choose a model: 'demo', a model folder or a hub id (org/name)")
    path = Path(model).expanduser().resolve()
    inside = any(path.is_relative_to(root.resolve()) for root in MODEL_ROOTS)
    if model == "demo" or (is_hub_id(model) and not inside):
        return model
    if not inside:
        roots = ", ".join(str(root) for root in MODEL_ROOTS)
        raise ConfigError(f"the page loads 'demo', a hub id (org/name) or a model folder below {roots}; put the "
                          "folder there, or start the app with --models-dir pointing at its parent")
    return str(path)


def model_choices() -> list[str]:
    """What the model field offers: the demo, the model folders below MODEL_ROOTS and the hub models in the local
    Hugging Face cache (they load offline)."""
    folders = sorted(str(p.parent) for root in MODEL_ROOTS for p in root.glob("*/config.json"))
    return ["demo", *folders, *cached_model_ids()]


def preview(upload, data_format, model, max_length, columns=None, chat_template="model"):
    """First rows as the model sees them (the loss-bearing part in [[...]]) and token statistics."""
    try:
        path = uploaded(upload)
        config = Config(data=str(path), data_format=data_format, columns=columns or None, chat_template=chat_template)
        tokenizer = load_tokenizer(resolve_model_path(checked_model(model)), trust_remote_code=False)
        examples, report = load_examples(path, data_format, tokenizer, int(max_length), config.column_map(),
                                         chat_template)
    except (ConfigError, DataError, OSError) as e:
        return error_text(e)
    except (TypeError, ValueError) as e:
        return f"**Error:** max length needs a number ({e})"
    rows = []
    for e in examples[:3]:
        prompt = tokenizer.decode([i for i, l in zip(e.input_ids, e.labels) if l == IGNORE])
        target = tokenizer.decode([i for i, l in zip(e.input_ids, e.labels) if l != IGNORE])
        rows.append(f"```\n{prompt}[[{target}]]\n```")
    return (f"**{sanitize_name(path.name)}**: {report.summary()}\n\nThe first rows as the model sees them; the loss "
            "is on the part in [[ ]] (the answers), the rest is context.\n\n" + "\n".join(rows))


def memory_estimate(model, load_in_4bit, rank, batch_size, max_length, init,
                    estimation_batch_size=Config.estimation_batch_size,
                    grad_budget_gib=None, nf4_error_rank=Config.nf4_error_rank, target_modules=Config.target_modules):
    """The estimated peak by part, and whether it fits this machine's card (or RAM) with what to lower if not."""
    from transformers import AutoConfig
    fields = dict(model=model, load_in_4bit=load_in_4bit, rank=rank, batch_size=batch_size, max_length=max_length,
                  init=init, estimation_batch_size=estimation_batch_size, grad_budget_gib=grad_budget_gib,
                  nf4_error_rank=nf4_error_rank, target_modules=target_modules)
    card_bytes, gpu = card()
    try:
        settings = {name: form_value(name, value) for name, value in fields.items()}
        model_config = AutoConfig.from_pretrained(resolve_model_path(checked_model(settings["model"])))
        config = Config(data="-", **settings)
        if decoder_shapes(model_config) is None:
            return f"**{weights_advice(model_config, config, card_bytes, torch.cuda.is_available())}** — {gpu}."
        estimate = estimate_memory_gib(model_config, config, card_bytes)
    except (ConfigError, OSError, ValueError) as e:
        return error_text(e)
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in estimate.items() if k != "total")
    slow = (" On the CPU a 4-bit run is slower (every weight is dequantized at each use, and the 4-bit error is "
            "corrected first): untick 4-bit (NF4) for a quicker run of a small model." if settings["load_in_4bit"]
            and not torch.cuda.is_available() else "")
    grows = (" Training then keeps activations in what the card has left, less 1 GiB, rather than recompute them: "
             "its memory use grows past this peak, as expected." if torch.cuda.is_available() else "")
    return (f"Estimated peak **{estimate['total']:.1f} GiB** ({parts} GiB) — {gpu}: "
            f"**{fit_advice(estimate, card_bytes / 2**30, torch.cuda.is_available())}**.{slow}{grows}")


def default_run_name(init: str) -> str:
    """A run's folder name when none is typed: the method and the time, lora_ga-20261206-031500."""
    return f"{init}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_name_or(run_name: str | None, default: str) -> str:
    """The run's folder name: the one typed, sanitized, or the default when none is (or nothing of it is left)."""
    return sanitize_name(run_name.strip(), default) if isinstance(run_name, str) else default


def form_value(name: str, value):
    """A form field's value as its Config setting's type; an empty optional box is None (its default)."""
    kind, _, optional = field_type(get_type_hints(Config)[name])
    if optional and (value is None or isinstance(value, str) and not value.strip()):
        return None
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
            if kind is float or number.is_integer():
                return kind(number)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{name} needs {KINDS[kind]}, got {value!r}")


def form_settings(form: dict) -> dict:
    """The Config settings the form gives, each checked to be of its kind (ConfigError names the field) before
    anything runs."""
    settings = {name: form_value(name, form[name]) for name in SETTINGS}
    return {**settings, "model": checked_model(settings["model"]), "eval_every": max(settings["steps"] // 10, 1)}


def from_root(path: Path) -> Path:
    """A path as a command run in the app's folder (ROOT) names it: relative below it, else absolute."""
    return path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


def form_configs(form: dict, name: str, stored: bool) -> list[Config]:
    """The run's Config (and its plain-LoRA baseline's, at LoRA's learning rate, on the uncorrected base: QLoRA on a
    4-bit one, when asked) from the form. stored: the uploads are copied into the run's folder (data/); else (the
    CLI command) into UPLOADED/<name>, and the paths are as a command run in the app's folder names them."""
    settings = form_settings(form)
    check_data(Config(data=str(uploaded(form["upload"])),  # the files' errors on the page now, not from the job
                      eval_data=form["eval_upload"] and str(uploaded(form["eval_upload"])), **settings))
    uploads = RUNS / name / "data" if stored else UPLOADED / name
    data = store_upload(form["upload"], uploads)
    eval_data = form["eval_upload"] and store_upload(form["eval_upload"], uploads)
    shown = (lambda path: path) if stored else from_root
    configs = [Config(data=str(shown(data)), eval_data=str(shown(eval_data)) if eval_data else None,
                      out=str(shown(RUNS / name)), progress=not stored,
                      **settings)]  # the command's progress bars for a terminal; the page shows its own
    if form["baseline"] and settings["init"] == "lora_ga":
        configs.append(dataclasses.replace(configs[0], init="lora", lr=DEFAULT_LR["lora"], nf4_error_rank=0,
                                           out=str(shown(RUNS / f"{name}-lora"))))  # what one runs without us: (Q)LoRA
    return configs


def show_command(*values):
    """The CLI command that runs what Train would (its main run; the data as copies of the files you uploaded, in
    UPLOADED), in the app's folder, where `python -m frugal_loraga` finds the package without an install."""
    form = dict(zip(FORM, values))
    try:
        config = form_configs(form, run_name_or(form["run_name"], default_run_name(form["init"])), stored=False)[0]
    except (ConfigError, DataError) as e:
        return error_text(e)
    return f"```bash\ncd {shlex.quote(str(ROOT))} && {command_line(config)}\n```"


def show_command_named(*values):
    """show_command, the run's name chosen now where none is typed and filled in, so that Train starts the run the
    command names (and another click reuses its copies of the uploads)."""
    form = dict(zip(FORM, values))
    name = run_name_or(form["run_name"], default_run_name(form["init"]))
    text = show_command(*[name if field == "run_name" else value for field, value in zip(FORM, values)])
    typed = isinstance(form["run_name"], str) and form["run_name"].strip()
    return text, gr.update() if typed or text.startswith("**Error") else name


def running_form() -> list:
    """The Train form as the running job filled it (its main run's settings, its name, whether a baseline runs), for a
    page loaded while it runs; unchanged fields (the file boxes: a file cannot be sent back) where none runs."""
    job = JOBS.job
    if not JOBS.busy() or not job.configs:
        return [gr.update() for _ in FORM]
    config = job.configs[0]
    shown = {name: getattr(config, name) for name in SETTINGS}
    try:
        checked_model(config.model)
    except ConfigError:  # a run made elsewhere (the CLI) names a folder the page does not show
        del shown["model"]
    shown.update({name: shown[name] or "" for name in ("columns", "grad_budget_gib")})  # text boxes: empty, not None
    shown.update(baseline=len(job.configs) > 1, run_name=job.run)
    return [shown[name] if name in shown else gr.update() for name in FORM]


def start(*values):
    """Start a new named run (and its plain-LoRA baseline, run_name-lora) in its own folder below RUNS."""
    form = dict(zip(FORM, values))
    name = run_name_or(form["run_name"], default_run_name(form["init"]))
    if JOBS.busy():  # before any file is touched (JOBS.launch checks again, under its lock)
        return BUSY
    try:
        for taken in (name, f"{name}-lora") if form["baseline"] and form["init"] == "lora_ga" else (name,):
            if read_record(RUNS / taken) is not None:
                raise ConfigError(f"a run named {taken} exists; choose another name, or select it under Runs and "
                                  "press Resume")
            shutil.rmtree(RUNS / taken / "data", ignore_errors=True)  # copies of a start refused before its record
        configs = form_configs(form, name, stored=True)  # every field checked before a file is copied
    except (ConfigError, DataError) as e:
        return error_text(e)
    return JOBS.launch(configs)


def resume(selected: str):
    """Continue the selected run with the settings read from its own folder (after a reload or a restart too)."""
    try:
        folder = run_folder(selected)
        check_not_running_elsewhere(folder)
        config = resume_config(folder)
    except (ConfigError, FileNotFoundError) as e:
        return error_text(e)
    return JOBS.launch([config])


def run_folder(selected: str) -> Path:
    """The folder of a run named in the list: a folder directly below RUNS that holds a run record."""
    folder = RUNS / sanitize_name(selected or "")
    if not selected or read_record(folder) is None:
        raise ConfigError("select a run under Runs first")
    return folder


def delete_run(selected: str) -> str:
    """Remove a run's folder: what the app wrote for it (record, checkpoint, adapter, metrics, data copy)."""
    try:
        folder = run_folder(selected)
        check_not_running_elsewhere(folder)
    except ConfigError as e:
        return error_text(e)
    with JOBS.idle(folder.name) as idle:
        if not idle:
            return f"{folder.name} is running: stop it before deleting it."
        shutil.rmtree(folder)
        JOBS.forget(folder.name)
    return f"Deleted {folder.name}."


def runs_table() -> pd.DataFrame:
    """The runs below RUNS, the last updated first."""
    columns = ["name", "status", "init", "steps", "train_loss", "eval_loss", "adapter", "message"]
    rows = [{c: row[c] for c in columns} for row in list_runs(RUNS, JOBS.busy(), JOBS.job.live_metrics())]
    return pd.DataFrame(rows, columns=columns).round(4)


CURVE_COLORS = {"lora_ga train": "#ff7f0e", "lora_ga eval": "#d62728", "lora train": "#1f77b4", "lora eval": "#9467bd"}


def loss_frame(rows) -> pd.DataFrame:
    """The plot's table (step, loss, curve), led by one empty row per curve: the browser fixes the colour legend
    when it first draws the plot, so every curve that may appear must be in it from the start."""
    placeholders = [(0, float("nan"), curve) for curve in CURVE_COLORS]
    frame = pd.DataFrame(placeholders + list(rows), columns=["step", "loss", "curve"])
    return frame.astype({"step": "int64", "loss": "float64", "curve": "str"})


def status():
    """The job's status line and its loss curves for the plot."""
    job = JOBS.job
    return job.status(), loss_frame(job.loss_points())


def poll(selected: str = ""):
    """The status, the runs and the run selected (the job's, when none is), and the timer kept running only while a
    job runs: an idle page makes no requests."""
    running = JOBS.busy()  # before the status: a job that ends in between is drawn finished at the next call
    table = runs_table()
    names = list(table["name"])
    run = JOBS.job.run
    chosen = selected if selected in names else (run if run in names else (names[0] if names else None))
    text, frame = status()
    plot = gr.LinePlot(frame, visible=bool(frame["loss"].notna().any()))  # no empty axes before the first loss
    return text, plot, gr.Timer(active=running), table, gr.Dropdown(choices=names, value=chosen)


TRY_LOADING = ("Loading the base model and the run's adapter, then generating (the first Try of a run loads its "
               "model)…")


def try_prompt(prompt: str, max_new_tokens: int = 64, selected: str = ""):
    """Greedy generation from the same prompt with the base model and with the selected run's adapter, the prompt
    formatted as that run's data was trained."""
    try:
        folder = run_folder(selected)
    except ConfigError as e:
        return f"Train first, or {e}.", ""
    if not has_adapter(folder):
        return f"{folder.name} has no adapter yet: resume it to the end, or stop it after a step.", ""
    try:
        outputs = JOBS.generate(folder, prompt, int(max_new_tokens))
    except (ConfigError, DataError, torch.cuda.OutOfMemoryError) as e:
        return f"Error: {e}", ""
    if outputs is None:
        return "A run is in progress; try again when it has finished.", ""
    return tuple(out.text + (f"\n[cut at {int(max_new_tokens)} new tokens]" if out.cut else "")
                 for out in (outputs["base"], outputs["adapter"]))


def export_zip(selected: str = ""):
    """The selected run's adapter as a zip, and the code that loads it."""
    try:
        folder = run_folder(selected)
    except ConfigError as e:
        return None, f"Train first, or {e}."
    if not has_adapter(folder):
        return None, f"{folder.name} has no adapter yet."
    archive = shutil.make_archive(str(folder / f"{folder.name}-adapter"), "zip", folder / "adapter")
    model = run_config(folder).model
    demo = model == "demo"  # its folder is the one frugal-loraga converts on each machine
    base = "demo_model_dir()" if demo else repr(model)
    fix = peft_load_fix(folder / "adapter")
    code = (f"Unzip {Path(archive).name} into a folder `{folder.name}-adapter`, then:\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            + ("from frugal_loraga.models import demo_model_dir\n" if demo else "") + (f"{fix}\n" if fix else "")
            + f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), "
              f"{folder.name + '-adapter'!r})\n```")
    return archive, code


def export_shown(selected: str = ""):
    """export_zip, its file box shown only with a file in it."""
    archive, code = export_zip(selected)
    return gr.File(archive, visible=archive is not None), code


def build_ui() -> gr.Blocks:
    defaults = Config(data=str(SAMPLE))
    choices = lambda name: field_type(get_type_hints(Config)[name])[1]  # a Literal setting's values, in order
    number = lambda name, label, **kw: gr.Number(value=getattr(defaults, name), label=label, info=HELP[name], **kw)
    with gr.Blocks(title="frugal-loraga") as ui:
        gr.Markdown("# frugal-loraga\nLoRA-GA fine-tuning on a 4-bit model: drop in data, press Train, watch it learn.")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Data")
                upload = gr.File(label="Data file (.jsonl .json .csv .txt); empty = shipped sample",
                                 file_types=sorted(ALLOWED), type="filepath")
                data_format = gr.Dropdown(choices("data_format"),
                                          value="auto", info=HELP["data_format"], label="Format")
                with gr.Row():
                    columns = gr.Textbox(label="Column mapping (when auto-detection fails)", info=HELP["columns"],
                                         placeholder="instruction=question,output=answer")
                    chat_template = gr.Radio(choices("chat_template"), value=defaults.chat_template, label="Chat template",
                                             info=HELP["chat_template"])
                preview_button = gr.Button("Preview")
                preview_box = gr.Markdown()
            with gr.Column():
                gr.Markdown("### Model")
                model = gr.Dropdown(model_choices(), value="demo", allow_custom_value=True,
                                    label="Model: 'demo', a local folder, or a hub id",
                                    info="the list: the demo, folders below ./models (python app.py --models-dir DIR) "
                                         "and the models in your Hugging Face cache; or type a hub id")
                load_in_4bit = gr.Checkbox(value=True, label="4-bit (NF4)", info=HELP["load_in_4bit"])
                memory_box = gr.Markdown()
        gr.Markdown("### Train")
        with gr.Row():
            init = gr.Radio(choices("init"), value="lora_ga", label="Init", info="lora_ga: A and B start from the "
                            "SVD of the full fine-tuning gradient, estimated on a few batches; lora: random A, zero B")
            rank = number("rank", "Rank")
            alpha = gr.Number(value=defaults.alpha, label="Alpha", info="the adapter's scale: " + HELP["use_rslora"])
            use_rslora = gr.Checkbox(value=defaults.use_rslora, label="rsLoRA", info=HELP["use_rslora"])
            lr = gr.Number(value=DEFAULT_LR[defaults.init], label="Learning rate", info=HELP["lr"])
        with gr.Row():
            steps = gr.Number(value=30, label="Steps", info=HELP["steps"])
            batch_size = number("batch_size", "Batch")
            max_length = gr.Number(value=256, label="Max length", info=HELP["max_length"])
            estimation_samples = gr.Number(value=16, label="Estimation samples",
                                           info=HELP["estimation_samples"])
            baseline = gr.Checkbox(value=False, label="Also train plain LoRA (QLoRA on a 4-bit base) for "
                                   "comparison, at LoRA's learning rate")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                grad_accum = number("grad_accum", "Gradient accumulation")
                schedule = gr.Dropdown(choices("schedule"), value=defaults.schedule, label="Schedule",
                                       info=HELP["schedule"])
                warmup_ratio = number("warmup_ratio", "Warmup ratio")
                seed = number("seed", "Seed")
            with gr.Row():
                target_modules = gr.Textbox(value=defaults.target_modules, label="Target modules",
                                            info=HELP["target_modules"])
                estimation_batch_size = number("estimation_batch_size", "Estimation batch")
                grad_budget_gib = gr.Textbox(label="Gradient budget (GiB)", placeholder="automatic",
                                             info=HELP["grad_budget_gib"])  # empty: None; a Number would send 0
                nf4_error_rank = number("nf4_error_rank", "4-bit error correction rank")
                compile_on = gr.Checkbox(value=defaults.compile, label="Compile (CUDA)", info=HELP["compile"])
            eval_upload = gr.File(label="Eval data file (empty: " + HELP["eval_data"].split("default: ")[-1] + ")",
                                  file_types=sorted(ALLOWED), type="filepath")
        with gr.Row():
            run_name = gr.Textbox(label="Run name (empty: the method and the time)")
            start_button, stop_button = gr.Button("Train", variant="primary"), gr.Button("Stop")
        command_button = gr.Button("Show the equivalent CLI command", size="sm")
        command_box = gr.Markdown()
        notice_box = gr.Markdown()  # what a button answers; the status below is redrawn while a job runs
        status_box = gr.Markdown("**idle**")
        plot = gr.LinePlot(loss_frame([]), x="step", y="loss", color="curve", color_map=CURVE_COLORS, label="Loss",
                           x_title="optimizer step", y_title="loss", x_axis_format="d", y_axis_format=".2f",
                           visible=False)
        gr.Markdown("### Runs")
        table = runs_table()
        runs = gr.Dataframe(table, label="Runs in runs/app (the last updated first)", interactive=False)
        with gr.Row():
            selected = gr.Dropdown(label="Run", choices=list(table["name"]), allow_custom_value=False)
            resume_button, delete_button = gr.Button("Resume"), gr.Button("Delete")
        gr.Markdown("### Try (the run selected above)")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="Ada has 12 apples and buys 30 more. How many apples does Ada have now?")
            try_button = gr.Button("Generate")
        with gr.Row():
            base_out, adapter_out = gr.Textbox(label="Base model"), gr.Textbox(label="With adapter")
        gr.Markdown("### Export (the run selected above)")
        export_button = gr.Button("Download adapter (.zip)")
        export_file, export_code = gr.File(label="Adapter", visible=False), gr.Markdown()  # shown with a file

        named = dict(upload=upload, eval_upload=eval_upload, data_format=data_format, columns=columns,
                     chat_template=chat_template, model=model, load_in_4bit=load_in_4bit, init=init, rank=rank,
                     alpha=alpha, use_rslora=use_rslora, lr=lr, steps=steps, batch_size=batch_size,
                     max_length=max_length, estimation_samples=estimation_samples, grad_accum=grad_accum,
                     schedule=schedule, warmup_ratio=warmup_ratio, target_modules=target_modules, seed=seed,
                     estimation_batch_size=estimation_batch_size, grad_budget_gib=grad_budget_gib,
                     nf4_error_rank=nf4_error_rank, compile=compile_on, baseline=baseline, run_name=run_name)
        form = [named[name] for name in FORM]
        LABELS.update({name: named[name].label for name in SETTINGS if "_" in name or name in MENTIONS})
        preview_inputs = [upload, data_format, model, max_length, columns, chat_template]
        preview_button.click(preview, preview_inputs, preview_box)
        upload.change(preview, preview_inputs, preview_box)  # a new file, or none (the sample), is shown at once
        ui.load(preview, preview_inputs, preview_box)  # the sample, selected when the page opens
        command_button.click(show_command_named, form, [command_box, run_name])
        estimate_inputs = [model, load_in_4bit, rank, batch_size, max_length, init, estimation_batch_size,
                           grad_budget_gib, nf4_error_rank, target_modules]
        for component in estimate_inputs[1:]:
            component.change(memory_estimate, estimate_inputs, memory_box)
        for event in (model.select, model.blur):  # not on every keystroke: a hub id would be looked up for each
            event(memory_estimate, estimate_inputs, memory_box)
        ui.load(memory_estimate, estimate_inputs, memory_box)
        init.change(lambda method: DEFAULT_LR[method], init, lr)  # each method's own learning rate
        timer = gr.Timer(1.0, active=False)
        shown = [status_box, plot, timer, runs, selected]
        timer.tick(poll, selected, shown)
        ui.load(poll, selected, shown)  # a reloaded page picks up the runs and a running job, and its settings
        ui.load(running_form, None, form)
        start_button.click(start, form, notice_box).then(poll, selected, shown)
        resume_button.click(resume, selected, notice_box).then(poll, selected, shown)
        stop_button.click(JOBS.stop, None, notice_box).then(poll, selected, shown)
        delete_button.click(delete_run, selected, notice_box).then(poll, selected, shown)
        try_button.click(lambda: (TRY_LOADING, ""), None, [base_out, adapter_out]).then(
            lambda text, run: try_prompt(text, 64, run), [prompt, selected], [base_out, adapter_out])
        export_button.click(export_shown, selected, [export_file, export_code])
    return ui


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="frugal-loraga web app")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--models-dir", action="append", default=[], help="a folder whose model folders the page "
                        "may load (repeatable; default: ./models); 'demo' and hub ids always work")
    args = parser.parse_args()
    MODEL_ROOTS[:] = [Path(d).expanduser() for d in args.models_dir] or MODEL_ROOTS
    keep_compiled_graphs()
    build_ui().queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                         share=args.share, max_file_size="50mb")
