"""The stages of a training run (`stages:` in the config, docs/training.md): where each starts and ends
in the run's steps, which one a step belongs to, and what a resume may change of them."""
from __future__ import annotations

from dataclasses import dataclass

from ttt_speech import schema

from .config import TrainConfig, resume_changes


@dataclass(frozen=True)
class Stage:
    """One stage: its place in the run and the config it runs as (`config.steps`: its own steps)."""

    index: int
    name: str | None  # None: a run without stages is one unnamed stage
    config: TrainConfig
    start: int  # the run's step before its first step

    @property
    def end(self) -> int:
        return self.start + self.config.steps

    @property
    def label(self) -> str:
        return self.name or "train"


def plan_stages(config: TrainConfig) -> list[Stage]:
    """The run's stages, back to back."""
    stages, start = [], 0
    for index, (name, stage_config) in enumerate(config.stage_configs()):
        stages.append(Stage(index, name, stage_config, start))
        start += stage_config.steps
    return stages


def stage_of(stages: list[Stage], step: int) -> Stage:
    """The stage whose steps include step `step` (1-based: the state after it); step 0: the first. A
    checkpoint at a stage's last step belongs to that stage: a resume there ends it, then starts the next
    as the uninterrupted run did."""
    return next((s for s in stages if s.start < step <= s.end), stages[0] if step <= 0 else stages[-1])


def check_resume_stages(saved: TrainConfig, current: TrainConfig, step: int) -> None:
    """A resume after `step` may change the stages that had not started (and add or drop later ones), not
    one that ran: each of those must run as it did (its config as `StageConfig.apply` makes it, so that a
    default spelled out is no change), with its steps. `saved`: the checkpoint's config."""
    before, now = plan_stages(saved), plan_stages(current)
    if bool(saved.stages) != bool(current.stages):
        raise ValueError(f"--resume: stages: the checkpoint's run has {'' if saved.stages else 'no '}stages and this "
                         f"config {'has' if current.stages else 'has none'}; a run keeps its stages (start a new run)")
    for stage in (s for s in before if s.start < step and s.name is not None):
        where = f"--resume: stages[{stage.index}] ({stage.name}) ran before step {step}"
        if stage.index >= len(now) or now[stage.index].name != stage.name:
            raise ValueError(f"{where}: this config does not have it there; change or add only later stages")
        if now[stage.index].config.steps != stage.config.steps:
            raise ValueError(f"{where}: its steps cannot change ({stage.config.steps} in the checkpoint, "
                             f"{now[stage.index].config.steps} now)")
        try:
            resume_changes(schema.to_dict(stage.config), schema.to_dict(now[stage.index].config))
        except ValueError as e:
            raise ValueError(f"{where}: {str(e).removeprefix('--resume: ')}") from None
