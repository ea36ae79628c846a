"""The training recipe's adapter for host llama (`model.host: llama`): a transformers Llama / Qwen2
causal LM (LLaMA-Omni's, LLaMA-Omni2's) trained on long token streams.

A stream is a manifest entry's token ids (`ttt_speech.data.tokens`: a `.npy` of ids, or a `.txt`
tokenized with the model's tokenizer and cached); its training form is inputs ids[:-1] over targets
ids[1:], [2, T - 1]. A window runs the patched model with a fresh `TTTCache` whose TTT slots
continue the row's carried states (`ttt_speech.llama.carry.CacheCarry`): attention sees the window,
TTT the whole stream. The loss is the mean next-token cross-entropy over real targets.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ttt_speech.config import TTTConfig
from ttt_speech.data.manifest import ManifestEntry
from ttt_speech.data.tokens import TEXT_SUFFIX, TOKEN_KINDS, check_ids, read_token_file, tokenize_text_file
from ttt_speech.models import ModelConfig

from ttt_speech_apps.eval.config import LengthGenConfig

from .config import TrainConfig
from .hosts import autocast

PAD = -1  # past a stream's end: no input (attention and TTT skip it), no loss


class TokenLoader:
    """Manifest entry → its token stream: `codes(i)` [1, T]; `loader(i)` inputs over targets [2, T - 1]."""

    def __init__(self, entries: list[ManifestEntry], lm: nn.Module, config: TrainConfig) -> None:
        from ttt_speech.llama.loading import load_llm_tokenizer

        self.entries, self.model, self.cache_dir = entries, config.model, config.data.codes_cache
        self.vocab_size = lm.config.vocab_size
        self.tokenizer = functools.cache(lambda: load_llm_tokenizer(config.model))  # loaded on first need

    def codes(self, index: int) -> Tensor:
        path = self.entries[index].path
        if path.suffix.lower() == TEXT_SUFFIX:
            tokenizer = self.tokenizer()
            if tokenizer is None:
                raise ValueError(f"{path}: a text file, and model.name {self.model.name} has no tokenizer (a random "
                                 "tiny model): give token ids (.npy)")
            ids = tokenize_text_file(path, tokenizer, self.model.name, Path(self.cache_dir))
        else:
            ids = read_token_file(path)
        return check_ids(ids, self.vocab_size, str(path))[None]

    def __call__(self, index: int) -> Tensor:
        ids = self.codes(index)[0]
        return torch.stack([ids[:-1], ids[1:]])


LOSS_CHUNK = 1024  # positions whose logits [1024, V] exist at once in the loss (V = 152,064 for Qwen2.5: 0.6 GB)


class TokenWindowModel(nn.Module):
    """The patched causal LM on one window, as a module's forward so that DDP / FSDP see the call: ids,
    targets [B, W] (PAD past a stream's end) and the window's `TTTCache` (None: no TTT) → the summed NLL
    of the real targets (float32, 0-dim). The output layer and the loss run `LOSS_CHUNK` positions at a
    time, recomputed in backward, so the window's logits [B, W, V] never exist whole."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor, targets: Tensor, cache=None) -> Tensor:
        from ttt_speech.llama import CACHE_KWARG
        from ttt_speech.llama.patch import decoder_stack

        real = ids != PAD
        mask = None if bool(real.all()) else real.long()  # right padding: TTT skips it (TTTModelMixin)
        kwargs = {CACHE_KWARG: cache} if cache is not None else {}
        hidden = decoder_stack(self.lm)(input_ids=ids.clamp_min(0), attention_mask=mask, use_cache=cache is not None,
                                        **kwargs).last_hidden_state  # [B, W, C]
        return chunked_nll(hidden.flatten(0, 1), targets.flatten(), self.lm.get_output_embeddings())


def chunked_nll(hidden: Tensor, targets: Tensor, head: nn.Module, chunk: int = LOSS_CHUNK) -> Tensor:
    """Summed cross-entropy of `head(hidden)` [N, V] against targets [N] (PAD: none), `chunk` rows at a
    time; under autograd each chunk's logits are recomputed in backward instead of kept."""
    def part(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(head(h).float(), t, ignore_index=PAD, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):  # split: one [N, C] gradient, not one per chunk
        total = total + (torch.utils.checkpoint.checkpoint(part, h, t, use_reentrant=False)
                         if torch.is_grad_enabled() else part(h, t))
    return total


@dataclass
class TokenTerms:
    """Summed next-token NLL over a window's real targets and their count (0-dim tensors)."""

    nll_sum: Tensor
    count: Tensor

    def stacked(self) -> Tensor:
        return torch.stack([self.nll_sum, self.count]).detach().float()


class LlamaHost:
    """Host llama: token streams, `TokenWindowModel` windows, `CacheCarry`, next-token loss."""

    unit = "tokens"
    kinds = TOKEN_KINDS

    def check_model(self, model: ModelConfig) -> None:
        """A Llama / Qwen2 (or a LLaMA-Omni checkpoint), from config.json alone."""
        from ttt_speech.llama.loading import check_llm

        check_llm(model)

    def patch(self, lm: nn.Module, ttt: TTTConfig) -> None:
        from ttt_speech.llama import patch_llama

        patch_llama(lm, ttt)  # logs its report

    def checkpoint_layers(self, lm: nn.Module) -> None:
        """TTT-aware: transformers' own checkpointing drops the TTT state."""
        from ttt_speech.llama import checkpoint_layers

        checkpoint_layers(lm)

    def loader(self, entries: list[ManifestEntry], lm: nn.Module, config: TrainConfig) -> TokenLoader:
        return TokenLoader(entries, lm, config)

    def pad_id(self, lm: nn.Module) -> int:
        return PAD

    def tokens_per_position(self, lm: nn.Module) -> int:
        return 1

    def window_model(self, lm: nn.Module, config: TrainConfig) -> nn.Module:
        return TokenWindowModel(lm)

    def layers(self, lm: nn.Module) -> list[nn.Module]:
        from ttt_speech.llama.patch import decoder_stack

        return list(decoder_stack(lm).layers)

    def carry(self, lm: nn.Module, rows: int):
        from ttt_speech.llama.carry import CacheCarry

        return CacheCarry(lm, rows)

    def window_terms(self, model: nn.Module, lm: nn.Module, config: TrainConfig, stream: Tensor, carry,
                     device: torch.device, evaluating: bool = False) -> TokenTerms:
        """stream [B, 2, W] (inputs over targets) → the window's terms; `carry`'s states go in and out
        through the window's cache."""
        inputs, targets = stream.to(device).unbind(1)
        cache = carry.window_cache() if carry is not None else None
        with autocast(config, device):
            nll_sum = model(inputs, targets, cache)
        if carry is not None:
            carry.window_ended(cache)
        return TokenTerms(nll_sum, (targets != PAD).sum().to(nll_sum.dtype))

    def summarize(self, stacked: Tensor) -> dict[str, float]:
        total, count = stacked.tolist()
        return {"loss": total / max(count, 1e-8)}

    def total_loss(self, terms: TokenTerms, global_sums: Tensor | None, world: int) -> Tensor:
        """The mean NLL; with data parallelism scaled by the global count, so that DDP's gradient average
        is the gradient of the global mean."""
        count = terms.count if global_sums is None else global_sums[1] / world
        return terms.nll_sum / count.clamp_min(1e-8)

    def length_gen(self, lm: nn.Module, entries: list[ManifestEntry], config: TrainConfig, folder: Path, wandb_run):
        from ttt_speech_apps.eval.length_gen import after_training

        loader = TokenLoader(entries, lm, config)
        streams = {entry.path.stem: loader.codes(i)[0] for i, entry in enumerate(entries)}
        return after_training(lm, streams, config.data.window_frames, config.length_gen, folder, wandb_run,
                              measure=token_length_generalisation)


def stream_nll(lm: nn.Module, ids: Tensor, chunk: int) -> np.ndarray:
    """Per-position NLL of a token stream ids [T] as `generate()` reads it: one `TTTCache` (attention's
    KV of the whole prefix, the TTT state carried), `chunk` tokens per forward. [T - 1] float64: entry t
    is the NLL of ids[t + 1] given ids[..t]."""
    from ttt_speech.handle import TTTModel
    from ttt_speech.llama import CACHE_KWARG, TTTCache
    from ttt_speech.llama.patch import decoder_stack
    from transformers import DynamicCache

    device = next(lm.parameters()).device
    cache = TTTCache(lm) if TTTModel.find(lm) is not None else DynamicCache(config=lm.config)
    head = lm.get_output_embeddings()
    out = []
    ids = ids.to(device)
    for start in range(0, ids.shape[0] - 1, chunk):
        window = ids[start:start + chunk + 1]
        hidden = decoder_stack(lm)(input_ids=window[None, :-1], use_cache=True,
                                   **{CACHE_KWARG: cache}).last_hidden_state[0]  # [n, C]
        for h, t in zip(hidden.split(LOSS_CHUNK), window[1:].split(LOSS_CHUNK)):  # never [n, V] logits whole
            out.append(F.cross_entropy(head(h).float(), t, reduction="none").double().cpu())
    nll = torch.cat(out).numpy()
    if not np.isfinite(nll).all():
        raise ValueError(f"non-finite NLL at token {int(np.argmin(np.isfinite(nll)))}")
    return nll


def token_length_generalisation(lm: nn.Module, streams: dict[str, Tensor], train_window: int,
                                lengths: LengthGenConfig) -> dict:
    """`eval.length_gen.length_generalisation`'s document for token streams ids [T]: perplexity of the first
    L tokens at the lengths grid (min_factor..max_factor x the training window), one group "tokens",
    each stream read as `generate()` reads it (`stream_nll`, `train_window` tokens per forward)."""
    from ttt_speech_apps.eval import metrics
    from ttt_speech_apps.eval.length_gen import length_document

    grid = metrics.evaluation_lengths(train_window, lengths.num_lengths, lengths.min_factor, lengths.max_factor)
    began = time.perf_counter()
    series = []
    for name, ids in streams.items():
        try:
            series.append({"tokens": stream_nll(lm, ids[:grid[-1] + 1], train_window)})
        except ValueError as e:
            raise ValueError(f"stream {name}: {e}") from None
    return length_document(list(streams), series, grid, train_window, max(1, grid[0] // 2), train_window,
                           time.perf_counter() - began, unit="tokens")
