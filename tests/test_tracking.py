"""Weights & Biases, one behaviour in every app (always offline or disabled here: no network).

The mode comes from the config, WANDB_MODE overrides it, `--wandb-offline` sets it (train and every
eval command); every wandb file lands under output_dir/wandb, nothing in the current directory;
`--resume` logs into the run it continues; keys are `train/...`, `eval/...`, `ttt/layer<i>/...`,
charted against `train/step`; images and tables never share a key; a failing tracker is a warning.
"""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from train_utils import TINY_MODEL, make_corpus, write_config

from ttt_speech.cli import main
from ttt_speech.stats import FastWeightStats
from ttt_speech.tracking import RUN_ID, WandbConfig
from ttt_speech_apps.finetune import monitor as monitor_module
from ttt_speech_apps.finetune.monitor import Monitor, wandb_key

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data"))


def eval_config(tmp_path: Path, corpus: dict, mode: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "ttt": {"mini_batch_size": 4},
        "data": {"manifest": str(corpus["eval"]), "codes_cache": str(tmp_path / "cache")},
        "eval": {"chunk_size": 8, "positions": [8, 16], "position_window": 4, "bin_frames": 8, "gain_window": 4},
        "output_dir": str(tmp_path / "out"), "wandb": {"mode": mode}}))
    return path


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.fixture
def sent(monkeypatch) -> dict[str, list]:
    """What real (offline) wandb runs receive: `init` kwargs, `log` payloads, logged artifacts."""
    import wandb
    from wandb.sdk.wandb_run import Run

    calls: dict[str, list] = {"init": [], "log": [], "artifacts": []}
    init, log, log_artifact = wandb.init, Run.log, Run.log_artifact
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls["init"].append(kwargs) or init(**kwargs))
    monkeypatch.setattr(Run, "log", lambda self, data, *a, **k:
                        calls["log"].append(dict(data)) or log(self, data, *a, **k))
    monkeypatch.setattr(Run, "log_artifact", lambda self, artifact, *a, **k:
                        calls["artifacts"].append(artifact) or log_artifact(self, artifact, *a, **k))
    return calls


def logged_keys(sent: dict[str, list]) -> set[str]:
    return {k for payload in sent["log"] for k in payload}


def test_eval_logs_under_output_dir_and_nothing_in_cwd(tmp_path, corpus, monkeypatch, sent):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = eval_config(tmp_path, corpus, "disabled")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment overrides the config ...
    assert main(["eval", "librilight", str(config), "--quiet"]) == 0
    (run,) = offline_runs(tmp_path / "out")
    assert list(cwd.iterdir()) == []  # ... and no ./wandb appears where the command ran
    assert {p.name for p in (run / "files").iterdir()} >= {"report.json", "report.md", "media"}
    (kwargs,) = sent["init"]
    assert kwargs["config"]["wandb"]["mode"] == "offline"  # the mode in effect, not the file's "disabled"

    monkeypatch.setenv("WANDB_MODE", "disabled")  # ... both ways
    assert main(["eval", "librilight", str(config), "--quiet", "output_dir=" + str(tmp_path / "off"),
                 "--wandb-offline"]) == 0
    assert not (tmp_path / "off" / "wandb").exists()

    monkeypatch.delenv("WANDB_MODE")  # without it, --wandb-offline turns logging on, in every eval command
    for command in ("librilight", "length-gen"):
        out = tmp_path / f"flag-{command}"
        sent["log"].clear()
        assert main(["eval", command, str(config), "--quiet", "--wandb-offline", f"output_dir={out}",
                     "eval.train_window=8"]) == 0
        assert len(offline_runs(out)) == 1, command
        prefix = "eval" if command == "librilight" else "length_gen"
        plot = "eval/plots/ppl_vs_length" if command == "librilight" else "length_gen/plots/length_gen"
        assert {plot, f"{prefix}/tables/length_gen"} <= logged_keys(sent), command  # the image and the table
    assert list(cwd.iterdir()) == []


def test_eval_memory_logs_too(tmp_path, corpus, monkeypatch, sent):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = tmp_path / "memory.yaml"
    config.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "models": [{"name": "ttt", "ttt": {"mini_batch_size": 4}}, {"name": "baseline"}],
        "data": {"manifest": str(corpus["eval"]), "codes_cache": str(tmp_path / "cache")},
        "segment_frames": 16, "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "memory", str(config), "--quiet"]) == 0  # wandb.mode: disabled by default
    assert not (tmp_path / "out" / "wandb").exists()
    assert main(["eval", "memory", str(config), "--quiet", "--wandb-offline", "--overwrite"]) == 0  # the same folder
    (run,) = offline_runs(tmp_path / "out")
    assert list(cwd.iterdir()) == []
    assert {p.name for p in (run / "files").iterdir()} >= {"memory.json", "memory.md", "media"}
    assert logged_keys(sent) == {"memory/plots/memory"}
    from ttt_speech_apps.eval.memory_probe import scalars

    report = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert scalars(report)["memory/ttt/cb1/delta"] == report["results"]["ttt"]["groups"]["cb1"]["delta"]


def test_resume_continues_the_wandb_run(tmp_path, corpus, monkeypatch, sent):
    path = write_config(tmp_path, corpus, steps=2)  # wandb.mode: disabled ...
    monkeypatch.setenv("WANDB_MODE", "offline")  # ... which the environment overrides, as in eval
    assert main(["train", str(path), "--quiet"]) == 0
    assert sent["init"][0]["config"]["wandb"]["mode"] == "offline"  # the run config shows the mode in effect
    out = tmp_path / "run"
    first = json.loads((out / "wandb" / RUN_ID).read_text())["id"]
    assert main(["train", str(path), "steps=4", "--resume", str(out), "--quiet"]) == 0
    assert sent["init"][1]["id"] == first and sent["init"][1]["resume"] == "allow"
    assert json.loads((out / "wandb" / RUN_ID).read_text())["id"] == first
    runs = offline_runs(out)
    assert len(runs) == 2 and all(f"-{first}" in r.name for r in runs)  # one run id, two sessions

    fresh = write_config(tmp_path / "b", corpus, steps=2, wandb={"mode": "offline"})
    assert main(["train", str(fresh), "--quiet"]) == 0  # another run: another id
    assert json.loads((tmp_path / "b" / "run" / "wandb" / RUN_ID).read_text())["id"] != first


class FakeRun:
    """What a wandb run receives (`log`, `log_artifact`, `summary`, `save`, `define_metric`)."""

    name = "fake"

    def __init__(self):
        self.logged, self.artifacts, self.summary, self.saved, self.defined = [], [], {}, [], {}

    def log(self, payload, step=None):
        self.logged.append((step, payload))

    def define_metric(self, name, step_metric=None):
        self.defined[name] = step_metric

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def save(self, path, **kwargs):
        self.saved.append(path)


def test_keys_are_namespaced_and_short(tmp_path, monkeypatch):
    assert [wandb_key(k) for k in ("loss", "grad_norm", "eval_loss", "eval_cb1_loss")] == [
        "train/loss", "train/grad_norm", "eval/loss", "eval/cb1_loss"]
    run = FakeRun()
    monkeypatch.setattr(monitor_module, "start_wandb", lambda *a: SimpleNamespace(run=run, finish=lambda: None))
    monitor = Monitor(tmp_path, WandbConfig(mode="offline"), {}, enabled=True)
    # every series is charted against the training step, a logged value (wandb's own step must only grow)
    assert run.defined == {"train/step": None, **{f"{p}/*": "train/step" for p in ("train", "eval", "ttt")}}
    monitor.log(10, {"loss": 2.0, "lr": 1e-3}, {0: FastWeightStats(w_norm=1.5, w_delta=0.5, eta_mean=0.1)})
    monitor.log(10, {"eval_loss": 2.5})
    assert run.logged == [(None, {"train/step": 10, "train/loss": 2.0, "train/lr": 1e-3, "ttt/layer0/w_norm": 1.5,
                                  "ttt/layer0/w_delta": 0.5, "ttt/layer0/eta_mean": 0.1}),
                          (None, {"train/step": 10, "eval/loss": 2.5})]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]) == {"step": 10, "eval_loss": 2.5}


def test_the_length_gen_image_and_table_have_their_own_keys(tmp_path):
    from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
    from ttt_speech_apps.eval.length_gen import FILES, LengthGenResult, length_generalisation
    from ttt_speech_apps.eval.writers import write_result
    from test_eval_run import random_streams

    lm = tiny_moshi_lm(card=64, text_card=100, context=16)
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    run = FakeRun()
    write_result(LengthGenResult({"ttt": length_generalisation(lm, random_streams(), train_window=8)}), tmp_path, FILES,
                 wandb_run=run)
    ((_, payload),) = run.logged
    assert set(payload) == {"length_gen/plots/length_gen", "length_gen/tables/length_gen"}
    import wandb

    assert isinstance(payload["length_gen/plots/length_gen"], wandb.Image)
    assert isinstance(payload["length_gen/tables/length_gen"], wandb.Table)
    assert any(k.startswith("length_gen/ttt/cb1/ppl@") for k in run.summary)
    assert {"length_gen/ttt/cb1/degradation_ratio", "length_gen/ttt/cb1/best_length",
            "length_gen/ttt/cb1/ppl_at_1x"} <= set(run.summary)  # the training system's figures


def test_training_logs_its_keys_length_gen_and_export(tmp_path, corpus, sent):
    path = write_config(tmp_path, corpus, steps=1, eval_every=1, length_gen={"num_lengths": 3},
                        **{"data.eval_manifest": str(corpus["eval"])})
    assert main(["train", str(path), "--quiet", "--wandb-offline"]) == 0
    keys = logged_keys(sent)
    assert {"train/step", "train/loss", "train/lr", "eval/loss", "length_gen/plots/length_gen",
            "length_gen/tables/length_gen"} <= keys
    assert any(re.fullmatch(r"ttt/layer\d+/w_norm", k) for k in keys)
    assert not any(k in keys for k in ("loss", "eval_loss"))  # metrics.jsonl's names stay in metrics.jsonl
    assert "eval_loss" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    (artifact,) = [a for a in sent["artifacts"] if a.type == "model"]  # (a wandb.Table is a run_table artifact)
    assert artifact.metadata["trainable"] == "full" and artifact.metadata["ttt"]["layer_type"] == "linear"
    assert {"model.json", "ttt.safetensors", "ttt_config.json"} <= set(artifact.manifest.entries)


def test_a_failing_tracker_is_a_warning(tmp_path, monkeypatch, caplog):
    class Broken(FakeRun):
        def log(self, payload, step=None):
            raise RuntimeError("wandb service died")

    run = Broken()
    monkeypatch.setattr(monitor_module, "start_wandb", lambda *a: SimpleNamespace(run=run, finish=lambda: None))
    monitor = Monitor(tmp_path, WandbConfig(mode="offline"), {}, enabled=True)
    monitor.log(1, {"loss": 2.0})
    monitor.log(2, {"loss": 1.0})  # wandb is off now; metrics.jsonl goes on
    assert monitor.wandb is None and "wandb failed to log (wandb service died)" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    from ttt_speech_apps.eval.writers import log_wandb

    log_wandb(run, SimpleNamespace(wandb_prefix="eval", scalars=dict, tables=dict), {}, [])  # results on disk: a warning

    assert "wandb failed to log the results" in caplog.text
