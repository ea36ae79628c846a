"""Sharing an export: what it holds as readable rows (`ttt-speech inspect`), its Hugging Face model
card, and the `ttt-speech export card / push` command (docs/architecture.md §1)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # .export imports torch: the command tree is built without it
    from .export import Export

TAGS = ["test-time-training", "speech"]  # and the host's own tag (`_host`)
HOSTS = {"moshi": ("moshi", "A [Moshi](https://github.com/kyutai-labs/moshi) speech language model"),
         "llama": ("llama-omni", "A transformers Llama / Qwen2 language model (the LLM of LLaMA-Omni / LLaMA-Omni2)")}
README = "README.md"
PUSH = (
    "Upload an export folder (model.json and its weights) to a Hugging Face model repo in one commit, "
    "with a model card as README.md: the folder's own README.md when it has one (e.g. written and edited "
    "with `export card --out DIR/README.md`), else the generated card. The repo is created when missing; "
    "log in first (`hf auth login`, or HF_TOKEN with a write token)."
)
CARD = (
    "Print the model card `export push` uploads (YAML front matter for the hub, then the base model, "
    "TTT config, trainable set, LoRA, training provenance and the eval figures the export carries), "
    "or write it with --out to review and edit before pushing."
)


def local_base_files(model: dict[str, Any]) -> list[str]:
    """What of model.json's base model exists only on this machine: "field=path" of each local file,
    and the checkpoint folder when the base is one (the export loads only where they exist)."""
    from .kyutai_files import is_checkpoint_folder
    from .models import LOCAL_FILES

    folder = [f"name={model['name']} (a checkpoint folder)"] if is_checkpoint_folder(str(model.get("name"))) else []
    return folder + [f"{k}={model[k]}" for k in LOCAL_FILES if model.get(k)]


def is_random_init(name: str) -> bool:
    """Whether a base model's name is one of the random-init tiny models (Moshi's, host llama's)."""
    from .models import TINY_LLMS

    return name == "tiny" or name in TINY_LLMS


def describe(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of an export's model.json: base model, trainable set, LoRA, provenance."""
    model = meta["model"]
    if is_random_init(model["name"]):
        kwargs = ", ".join(f"{k}={v}" for k, v in model.get("tiny", {}).items())
        base = f"{model['name']} (random-init, seed {model.get('seed', 0)}{', ' + kwargs if kwargs else ''})"
    else:
        base = model["name"]
    lora = meta.get("lora")
    rows = [("base model", f"{base}, {model.get('dtype', 'float32')}"),
            ("trainable", str(meta.get("trainable"))),
            ("LoRA", f"rank {lora['rank']}, scale {lora['scale']:g}" if lora else "none"),
            ("TTT layers", "yes (ttt_config.json)" if meta.get("ttt") else "none")]
    local = local_base_files(model)
    if local:
        rows.insert(1, ("base files", "local: " + ", ".join(local)))
    provenance = meta.get("provenance")
    if provenance is None:
        return rows + [("provenance", "not recorded (written before ttt-speech recorded it)")]
    data = provenance.get("data") or {}
    if "steps" in provenance:
        rows.append(("steps trained", str(provenance["steps"])))
    if data.get("train_manifest"):
        hours = data.get("hours")
        rows.append(("train data", f"{data['train_manifest']} ({data.get('entries', '?')} entries, "
                                   f"{'unknown hours' if hours is None else f'{hours:.3g} h'})"))
    if data.get("eval_manifest"):
        rows.append(("eval data", data["eval_manifest"]))
    if provenance.get("train_loss") is not None:
        rows.append(("final train loss", f"{provenance['train_loss']:.4g}"))
    if provenance.get("eval"):
        rows.append(("final eval", ", ".join(f"{k}={v:.4g}" for k, v in provenance["eval"].items())))
    rows.append(("ttt-speech", f"{provenance.get('ttt_speech_version') or 'unknown version'}, commit "
                               f"{provenance.get('git_commit') or 'unknown'}"))
    return rows


def model_card(export: Export, repo_id: str | None = None, license: str | None = None) -> str:
    """The hub model card (README.md) of `export`: YAML front matter (library_name, base_model, tags,
    license) and a body describing the model and how it was trained."""
    from huggingface_hub import ModelCardData

    from .export import TRAINS_EVERYTHING

    meta, directory = export.meta, export.directory
    name = meta["model"]["name"]
    from .kyutai_files import is_checkpoint_folder

    llama = meta["model"].get("host") == "llama"
    tag, what = HOSTS["llama" if llama else "moshi"]
    on_hub = not is_random_init(name) and not is_checkpoint_folder(name) and not Path(name).is_dir()
    front = ModelCardData(library_name="ttt-speech", base_model=name if on_hub else None, tags=[tag, *TAGS],
                          license=license).to_yaml()
    shown = repo_id or "namespace/name"
    held = ("every weight" if export.trainable in TRAINS_EVERYTHING else
            " and ".join(part for part, present in (("the TTT layers", export.has_ttt),
                                                    ("the LoRA adapters", export.lora)) if present))
    rows = describe(meta)
    folder = directory.resolve()  # a run's export/ is named for its run folder
    title = repo_id.split("/")[-1] if repo_id else (folder.parent.name if folder.name == "export" else folder.name)
    lines = [f"---\n{front}\n---", "", f"# {title}", "",
             f"{what} with Test-Time-Training (TTT) layers, fine-tuned with ttt-speech. Loading builds the base model "
             f"({'the tiny random-init model' if is_random_init(name) else f'`{name}`, from its own repo'}) and applies "
             f"the weights of this repo ({held or 'none'}).", "",
             "## Use", "", "```python", "from ttt_speech.export import load_exported_lm", "",
             f'lm, model = load_exported_lm("{shown}")  # pinned: "{shown}@<tag or commit>"', "```", "",
             f"`ttt-speech inspect {shown}` prints what it holds.", "",
             "## Model", "", "| | |", "|---|---|",
             *(f"| {label} | {value} |" for label, value in rows if label in ("base model", "trainable", "LoRA")), "",
             "| file | bytes |", "|---|---|",
             *(f"| `{f}` | {(directory / f).stat().st_size:,} |" for f in export.files), ""]
    saved = export.saved_ttt
    if saved is not None:
        lines += ["## TTT layers", "", "```", str(saved.report), "```", "", "| TTTConfig field | value |", "|---|---|",
                  *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in saved.config.to_dict().items()), ""]
    training = [(label, value) for label, value in rows if label not in ("base model", "trainable", "LoRA",
                                                                         "TTT layers", "final eval")]
    lines += ["## Training", "", "| | |", "|---|---|", *(f"| {label} | {value} |" for label, value in training), ""]
    figures = export.provenance.get("eval")
    if figures and llama:
        lines += ["## Evaluation", "", "Mean next-token cross-entropy (nats per token) on the held-out token streams at "
                  "the end of training, window by window with the TTT state carried as in training.", "",
                  "| metric | value |", "|---|---|", *(f"| `{k}` | {v:.4f} |" for k, v in figures.items()), ""]
    elif figures:
        lines += ["## Evaluation", "", "Teacher-forced losses (nats per token) on the held-out manifest at the end "
                  "of training, weighted as in training: `eval_loss` = text + audio, the audio a weighted mean over "
                  "the codebooks (`data.first_codebook_weight`), the text's padding down-weighted "
                  "(`data.text_padding_weight`).", "", "| metric | value |", "|---|---|",
                  *(f"| `{k}` | {v:.4f} |" for k, v in figures.items()), ""]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="share an export on the Hugging Face hub (model card, upload)",
                            description="Share a fine-tuning export: review its model card, push it to the hub. "
                                        "Load one back with load_exported_lm('namespace/name[@revision]').")
    tools = export.add_subparsers(dest="export_command", required=True, metavar="ACTION")
    card = tools.add_parser("card", help="print or write the model card `export push` would upload", description=CARD)
    card.add_argument("export", metavar="DIR_OR_REPO", help="export folder, or hub repo id namespace/name[@revision]")
    card.add_argument("--repo-id", help="repo id shown in the card's loading example (default: a placeholder)")
    card.add_argument("--license", help="license id for the front matter, e.g. cc-by-4.0 (the Moshi weights' "
                                        "license); default: none written")
    card.add_argument("--out", type=Path, help="write the card to this file (e.g. DIR/README.md, which push then "
                                               "uploads as it is) instead of printing it")
    card.set_defaults(func=_card)
    push = tools.add_parser("push", help="upload an export folder with its model card to a hub repo", description=PUSH)
    push.add_argument("export", type=Path, metavar="DIR", help="export folder written by `ttt-speech train`")
    push.add_argument("repo_id", metavar="REPO_ID", help="hub model repo namespace/name (created when missing)")
    push.add_argument("--revision", "--branch", dest="revision",
                      help="branch to commit to, created from main when missing (default: main)")
    push.add_argument("--private", action="store_true",
                      help="create the repo private (an existing repo keeps its visibility)")
    push.add_argument("--message", help="commit message (default: 'Upload ttt-speech export (N steps)')")
    push.add_argument("--license", help="license id for the generated card's front matter, e.g. cc-by-4.0")
    push.set_defaults(func=_push)


def _card(args: argparse.Namespace) -> int:
    from .export import Export
    from .files import write_text_atomic, writable_file

    from .hub import parse_hub_source

    parsed = None if Path(args.export).exists() else parse_hub_source(str(args.export))
    repo_id = args.repo_id or (parsed[0] if parsed else None)  # a card of a hub export names its own repo
    text = model_card(Export.open(args.export), repo_id, args.license)
    if args.out is None:
        print(text, end="")
        return 0
    write_text_atomic(writable_file(args.out, "--out"), text)
    print(f"model card written to {args.out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .export import Export
    from .hub import check_repo_id, push_folder

    repo_id = check_repo_id(args.repo_id, "REPO_ID")
    directory = args.export
    if not directory.is_dir():  # never a hub id here: a mistyped folder must not be downloaded
        raise ValueError(f"{directory}: not a folder (expected an export folder written by `ttt-speech train`)")
    export = Export.open(directory)
    steps = export.provenance.get("steps")
    local = local_base_files(export.meta.get("model") or {})
    if local:  # the export loads only where those files exist: say so before it is shared
        print(f"ttt-speech export push: warning: model.json names local files ({', '.join(local)}); others who "
              "load the export from the hub need the same files at the same paths, or `model:` overrides",
              file=sys.stderr)
    own = directory / README
    readme = own.read_text() if own.is_file() else model_card(export, repo_id, args.license)
    files = export.files
    message = args.message or f"Upload ttt-speech export{f' ({steps} steps)' if steps is not None else ''}"
    url = push_folder(directory, files, readme, repo_id, args.revision, args.private, message)
    card = "the folder's own" if own.is_file() else "generated"
    print(f"pushed {', '.join(files)} and {README} ({card}) to {repo_id}"
          f"{'@' + args.revision if args.revision else ''}: {url}")
    return 0
