"""`SynthConfig`: the fields of the synthetic corpus (`ttt_speech.data.synthetic` explains them).

Kept apart from the generator so that the command line can list the fields without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import check, doc


@dataclass
class SynthConfig:
    """The synthetic corpus (`ttt-speech data synth`; the demo's `corpus` section)."""

    recordings: int = doc(2416, "recordings in all (training + held-out)")
    frames: int = doc(512, "mean frames per training recording (12.5 frames = 1 s)")
    length_jitter: float = doc(0.5, "training recording lengths are uniform in frames x [1 - jitter, 1 + jitter]")
    eval_recordings: int = doc(16, "recordings held out in eval.jsonl (the last ones)")
    eval_frames: int | None = doc(1024, "frames per held-out recording (null: like the training recordings)")
    card: int = doc(64, "audio codes 0..card-1 (the model's card must be at least this)")
    vocab: int = doc(8, "private vocabulary of the semantic codebook per recording (0: all card codes)")
    repeat_prob: float = doc(0.5, "probability that a frame keeps the previous frame's semantic code")
    acoustic_coupling: float = doc(0.5, "probability that an acoustic code is the fixed function of the semantic "
                                        "one (else uniform noise)")
    num_motifs: int = doc(0, "private motifs per recording (0: free speech only)")
    motif_frames: int = doc(16, "frames per motif")
    motif_prob: float = doc(0.5, "probability that a segment replays a motif (when num_motifs > 0)")
    seed: int = doc(0, "seed: the same config and seed give the same corpus, bit for bit")

    def __post_init__(self) -> None:
        for name in ("recordings", "frames", "card", "motif_frames"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"synth.{name}",
                  "a positive integer", value)
        check(0 <= self.length_jitter < 1, "synth.length_jitter", "a number in [0, 1)", self.length_jitter)
        check(0 <= self.eval_recordings < self.recordings, "synth.eval_recordings",
              f"an integer in 0..{self.recordings - 1}", self.eval_recordings)
        check(self.eval_frames is None or self.eval_frames >= 1, "synth.eval_frames", "null or a positive integer",
              self.eval_frames)
        check(2 <= self.card <= 2048, "synth.card", "an integer in 2..2048", self.card)
        check(isinstance(self.vocab, int) and not isinstance(self.vocab, bool) and 0 <= self.vocab <= self.card,
              "synth.vocab", f"an integer in 0..card ({self.card})", self.vocab)
        check(0 <= self.repeat_prob < 1, "synth.repeat_prob", "a probability in [0, 1)", self.repeat_prob)
        check(0 <= self.acoustic_coupling <= 1, "synth.acoustic_coupling", "a probability in [0, 1]",
              self.acoustic_coupling)
        check(self.num_motifs >= 0, "synth.num_motifs", "an integer >= 0", self.num_motifs)
        check(0 < self.motif_prob <= 1, "synth.motif_prob", "a number in (0, 1]", self.motif_prob)

    def is_eval(self, index: int) -> bool:
        return index >= self.recordings - self.eval_recordings
