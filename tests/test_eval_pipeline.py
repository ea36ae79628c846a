"""The evaluation lifecycle (eval/pipeline.py): a probe defined here, outside the app, runs through
`evaluate` with the app's plan, builder, stream loader and writers, and nothing else: what a new
probe needs is a probe class and a result class."""
import gc
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ttt_speech.data.synthetic import SynthConfig, write_corpus
from ttt_speech.figures import pyplot, save_figure
from ttt_speech.schema import from_dict
from ttt_speech_apps.eval.config import EvalConfig
from ttt_speech_apps.eval.pipeline import evaluate
from ttt_speech_apps.eval.plan import plan_eval
from ttt_speech_apps.eval.streams import load_data
from ttt_speech_apps.eval.writers import OutputFiles

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class FramesResult:
    frames: dict[str, int]
    plots: dict[str, str] = field(default_factory=dict)
    wandb_prefix: str = "frames"

    def document(self) -> dict:
        return {"frames": self.frames, "plots": self.plots}

    def markdown(self) -> str:
        return "\n".join(f"- {name}: {n} frames" for name, n in self.frames.items()) + "\n"

    def summary_lines(self) -> list[str]:
        return [f"{name} {n}" for name, n in self.frames.items()]

    def scalars(self) -> dict[str, float]:
        return {f"frames/{name}": float(n) for name, n in self.frames.items()}

    def tables(self) -> dict:
        return {}

    def tensors(self) -> None:
        return None

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        fig, ax = pyplot().subplots()
        ax.bar(list(self.frames), list(self.frames.values()))
        path = save_figure(fig, output_dir / files["bars"])
        self.plots = {"bars": path.name}
        return {"bars": path}


class Frames:
    """A toy probe: the frames each model would score; it also records, as each model arrives,
    whether the models before it are still alive."""

    kind = "frames"
    files = OutputFiles("frames.json", "frames.md", {"bars": "bars.png"})

    def __init__(self, config: EvalConfig):
        self.config = config
        self.alive_when_built: list[list[bool]] = []

    def plan(self):
        return plan_eval(self.config)

    def load(self, plan, lm, progress):
        return load_data(plan.data, lm, plan.base, progress)

    def run(self, plan, models, data, progress):
        frames, built = {}, []
        for model in models:
            gc.collect()
            self.alive_when_built.append([ref() is not None for ref in built])
            built.append(weakref.ref(model.lm))
            frames[model.name] = sum(s.frames for s in data.streams)
            del model
        return FramesResult(frames)


@pytest.fixture
def config(tmp_path):
    corpus = write_corpus(SynthConfig(recordings=3, frames=40, eval_recordings=2, eval_frames=48, card=64), tmp_path)
    return from_dict(EvalConfig, {
        "model": {"tiny": {"card": 64, "text_card": 100}, "device": "cpu"}, "ttt": {"mini_batch_size": 4},
        "eval": {"baseline": True, "inner_loop": {"online": {"mini_batch_size": 1, "scale": "keep_per_token"}}},
        "data": {"manifest": str(corpus["eval"]), "codes_cache": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "out")}, "config")


def test_a_probe_defined_outside_the_app_runs_through_the_lifecycle(config, tmp_path):
    probe = Frames(config)
    result, paths = evaluate(probe, progress=False)
    assert result.frames == {"ttt": 96, "ttt@online": 96, "baseline": 96}  # the plan's models, the variant's label
    assert json.loads(paths["json"].read_text()) == {"frames": result.frames, "plots": {"bars": "bars.png"}}
    assert paths["markdown"].read_text().startswith("- ttt: 96 frames")
    assert paths["bars"].read_bytes()[:8] == PNG
    # one model in memory at a time: the variant shares the trained model's LM, the baseline is built
    # after both are gone
    assert probe.alive_when_built == [[], [True], [False, False]]
    with pytest.raises(ValueError, match="holds frames.json"):  # the folder is claimed like the app's probes'
        evaluate(Frames(config), progress=False)


def test_a_model_of_another_stream_layout_is_refused_before_any_model_is_built(config, tmp_path, monkeypatch):
    """`compare` exports of one codec may still lay the streams out differently (here: another text
    vocabulary): refused from their configs, before the first model is built and scored."""
    from dataclasses import replace

    from ttt_speech import tiny_moshi_lm
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig
    from ttt_speech_apps.eval import pipeline

    other = ModelConfig(tiny={"card": 64, "text_card": 50}, device="cpu")
    save_export(tiny_moshi_lm(card=64, text_card=50), other, tmp_path / "other", trainable="full")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(ValueError, match=r"compare.small: its streams \(codebooks, audio streams, card, text card\) "
                                         r"\(17, 8, 64, 50\) differ from ttt's \(17, 8, 64, 100\)"):
        evaluate(Frames(replace(config, compare={"small": tmp_path / "other"})), progress=False)
