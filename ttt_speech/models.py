"""Model builders: Moshi-architecture LMs (tiny random-init ones for CPU work, real ones from the hub)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .families import check_commands_support
from .kyutai_files import check_folder, checkpoint_files, is_checkpoint_folder, read_config
from .schema import doc

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Moshi-7B's LM kwargs (moshi/models/loaders.py `_lm_kwargs`) with every size shrunk: the same
# stream layout (1 text + 8 Moshi audio + 8 user audio streams, delays), norms, gating and RoPE.
TINY_MOSHI_KWARGS: dict[str, Any] = {
    "dim": 128,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 4,
    "num_layers": 4,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 64,
    "depformer_dim_feedforward": int(4.125 * 64),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def tiny_moshi_lm(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **overrides: Any):
    """A randomly initialised Moshi-architecture `LMModel` (default: dim 128, 4 layers, depformer 2)."""
    from moshi.models.lm import LMModel

    kwargs = {**TINY_MOSHI_KWARGS, **overrides}
    unknown = set(overrides) - set(TINY_MOSHI_KWARGS)
    if unknown:
        raise ValueError(f"tiny_moshi_lm: unknown override(s) {sorted(unknown)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LMModel(device=device, dtype=dtype, **kwargs).eval()


def pretrained_moshi_lm(hf_repo: str = "kyutai/moshiko-pytorch-bf16", device: str | torch.device = "cuda",
                        dtype: torch.dtype = torch.bfloat16):
    """Moshi weights from the Hugging Face hub through moshi's own loaders (needs network access)."""
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo(hf_repo)
    return info.get_moshi(device=device, dtype=dtype).eval()


LOCAL_FILES = ("moshi_weights", "mimi_weights", "config_path", "text_tokenizer")  # ModelConfig fields naming local files
TINY_LLMS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}  # host llama: name → `ttt_speech.llama.tiny_llm` arch


@dataclass
class ModelConfig:
    """Which LM (and, for Moshi, which Mimi codec) to build: shared by training, evaluation and generation."""

    host: Literal["moshi", "llama"] = doc("moshi", "the model family: moshi (Kyutai's Moshi LM and Mimi), or llama (a "
                                                   "transformers Llama / Qwen2 causal LM, e.g. LLaMA-Omni2's LLM: "
                                                   "`ttt-speech train` only, docs/llama_omni.md)")
    name: str = doc("tiny", "'tiny' (random-init Moshi-architecture model, no download), a Hugging Face repo id "
                            "such as kyutai/moshiko-pytorch-bf16, or a local checkpoint folder laid out as Kyutai's "
                            "repos (config.json and the files it names, e.g. from `hf download REPO --local-dir DIR`)")
    moshi_weights: Path | None = doc(None, "local Moshi LM weights (.safetensors) used instead of the hub file")
    mimi_weights: Path | None = doc(None, "local Mimi codec weights used instead of the hub file")
    config_path: Path | None = doc(None, "local config.json of the checkpoint (its LM kwargs, model_type and file names; "
                                         "a legacy repo without one is Moshi-7B)")
    text_tokenizer: Path | None = doc(None, "local SentencePiece .model of the text stream (for word-timed "
                                            "transcripts); null: the checkpoint's (hub); the tiny model has none")
    tiny: dict = doc(factory=dict, help="overrides of the tiny model's kwargs (e.g. {dim: 64, card: 64, context: 32}; "
                                        "host llama: the config fields of tiny-llama / tiny-qwen2, e.g. {hidden_size: 32})")
    seed: int = doc(0, "initialisation seed of the tiny model and of the random Mimi")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "parameter dtype of the LM (TTT state is always float32)")
    device: str = doc("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name: expected 'tiny', a Hugging Face repo id or a checkpoint folder, got ''")
        if self.host == "llama":
            self._check_llama()
            return
        for key in LOCAL_FILES:
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"model.{key}: {path} is a directory, expected a file" if Path(path).is_dir()
                                 else f"model.{key}: {path} is not a readable file")
        if self.name != "tiny" and Path(self.name).expanduser().is_dir():  # a folder wins over a repo id
            self.name = str(Path(self.name).expanduser().resolve())  # an export records it: valid from anywhere
            check_folder(Path(self.name))
        elif self.name.startswith(("/", ".", "~")) or self.name.count("/") > 1:  # a path, never a repo id
            raise ValueError(f"model.name: {self.name}: no such checkpoint folder (expected 'tiny', a Hugging Face "
                             "repo id namespace/name or a checkpoint folder)")
        elif "@" in self.name:  # moshi's loaders read a repo's main branch: no revision, and never a folder
            raise ValueError(f"model.name: {self.name!r} is a malformed hub id (expected namespace/name: a base model "
                             "is read from its repo's main branch, no @revision)")
        if self.name == "tiny":
            ignored = [k for k in ("moshi_weights", "mimi_weights", "config_path") if getattr(self, k) is not None]
            if ignored:  # (a text tokenizer is the one file a tiny model reads: word-timed transcripts)
                raise ValueError(f"model.{ignored[0]}: the tiny model is random-init and reads no checkpoint file; "
                                 "set model.name to the checkpoint's hub repo id or folder")
            unknown = sorted(set(self.tiny) - set(TINY_MOSHI_KWARGS))
            if unknown:
                raise ValueError(f"model.tiny: unknown kwarg(s) {unknown}; allowed: {sorted(TINY_MOSHI_KWARGS)}")
            if self.tiny:
                check_tiny_kwargs(self.tiny)
        parse_device(self.device)

    def _check_llama(self) -> None:
        """host llama: a tiny model, a transformers checkpoint folder or a hub id; no Kyutai file."""
        given = [k for k in LOCAL_FILES if getattr(self, k) is not None]
        if given:
            raise ValueError(f"model.{given[0]}: a Kyutai checkpoint file; model.host llama reads a transformers "
                             "checkpoint (its folder or hub id in model.name)")
        if self.name in TINY_LLMS:
            from .llama.models import check_tiny_llm_kwargs

            check_tiny_llm_kwargs(self.tiny)
        elif Path(self.name).expanduser().is_dir():
            self.name = str(Path(self.name).expanduser().resolve())
            if not (Path(self.name) / "config.json").is_file():
                raise ValueError(f"model.name: {self.name} has no config.json (expected a transformers checkpoint "
                                 "folder, e.g. from `hf download REPO --local-dir DIR`)")
        elif self.name.startswith(("/", ".", "~")) or self.name.count("/") != 1 or "@" in self.name:
            raise ValueError(f"model.name: {self.name!r}: expected {' or '.join(TINY_LLMS)}, a Hugging Face repo id "
                             "namespace/name or a transformers checkpoint folder")
        if self.tiny and self.name not in TINY_LLMS:
            raise ValueError(f"model.tiny: overrides the kwargs of a tiny model; model.name is {self.name!r}")
        parse_device(self.device)

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def is_llama(self) -> bool:
        """Whether the model is a transformers Llama / Qwen2 (host llama), not a Moshi LM."""
        return self.host == "llama"

    @property
    def is_folder(self) -> bool:
        """Whether `name` is a local checkpoint folder (held resolved, so: an absolute path)."""
        return is_checkpoint_folder(self.name)

    def given_files(self) -> dict[str, Path | None]:
        """The local files named explicitly, as moshi's `from_hf_repo` names them."""
        return {"moshi_weights": self.moshi_weights, "mimi_weights": self.mimi_weights,
                "tokenizer": self.text_tokenizer, "config_path": self.config_path}

    def torch_device(self) -> torch.device:
        """The device to run on; one that this machine does not have is a ValueError."""
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def codec_id(self) -> str:
        """Identity of the Mimi codec, part of the key of cached codes."""
        if self.is_tiny:
            from .moshi.random_mimi import VERSION

            return f"mimi-random-v{VERSION}-seed{self.seed}"
        mimi = self.mimi_weights or (checkpoint_files(self.name, self.given_files(), "mimi_weights")["mimi_weights"]
                                     if self.is_folder else None)
        if mimi is not None:
            return f"mimi-local-{Path(mimi).resolve()}"
        return f"mimi-{self.name}"


DEVICE_TYPES = ("cpu", "cuda", "mps")
MAX_TINY_PARAMS = 2_000_000_000  # a "tiny" model past Moshi-7B's size is a typo, not a test model


def parse_device(name: str, field: str = "model.device") -> torch.device | None:
    """`name` as a torch device (None for 'auto'); another kind of name is a ValueError naming `field`."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"{field}: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def resolve_device(name: str, field: str = "model.device") -> torch.device:
    """The device `name` means on this machine ('auto': cuda when available, else cpu); a device the
    machine does not have is a ValueError naming `field`, not a CUDA error deep inside torch."""
    device = parse_device(name, field)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{field}: {name!r} requested, but this machine has no CUDA device (torch "
                             f"{torch.__version__}); use cpu or auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{field}: {name!r} requested, but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}: 'mps' requested, but this machine has no MPS device; use cpu or auto")
    return device


def check_tiny_kwargs(overrides: dict[str, Any]) -> None:
    """Build the tiny model of `overrides` on the meta device (no memory): kwargs moshi cannot build,
    or a model too large to be a tiny one, are a one-line ValueError naming model.tiny."""
    for key, value in overrides.items():
        default = TINY_MOSHI_KWARGS[key]
        if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"model.tiny.{key}: expected an integer >= 1, got {value!r}")
    kwargs = {**TINY_MOSHI_KWARGS, **overrides}
    for width, heads in (("dim", "num_heads"), ("depformer_dim", "depformer_num_heads")):
        if kwargs[width] % kwargs[heads]:
            raise ValueError(f"model.tiny: {width} = {kwargs[width]} is not a multiple of {heads} = {kwargs[heads]}")
    if len(kwargs["delays"]) != kwargs["n_q"] + 1:
        raise ValueError(f"model.tiny.delays: expected n_q + 1 = {kwargs['n_q'] + 1} delays (text, then each audio "
                         f"stream), got {len(kwargs['delays'])}")
    try:
        lm = tiny_moshi_lm(device="meta", **overrides)
    except Exception as e:  # noqa: BLE001 - moshi asserts / raises many kinds on kwargs it cannot build
        raise ValueError(f"model.tiny: moshi cannot build this model ({type(e).__name__}: {e})") from None
    params = sum(p.numel() for p in lm.parameters())
    if params > MAX_TINY_PARAMS:
        raise ValueError(f"model.tiny: these kwargs make a {params / 1e9:.1f}B-parameter model (at most "
                         f"{MAX_TINY_PARAMS / 1e9:g}B for a tiny one)")


def check_family(config: ModelConfig) -> None:
    """Refuse, from the checkpoint's config.json alone (before data or weights are read), a model
    family the commands do not run (`ttt_speech/families.py`)."""
    if config.is_llama:  # `ttt-speech train` takes it (it does not call this); the Moshi commands do not
        raise ValueError("model.host: llama models are trained by `ttt-speech train` and run through transformers "
                         "(`generate` with a TTTCache, docs/llama_omni.md); this command runs Moshi models")
    if config.is_tiny:
        return
    config_path = checkpoint_files(config.name, config.given_files(), "config").get("config_path")
    if config_path is not None:  # a legacy repo without one is Moshi-7B
        raw = read_config(config_path)
        check_commands_support(raw.get("model_type", "moshi"), raw, f"model.name {config.name}")


STREAM_KWARGS = ("n_q", "dep_q", "card", "text_card")  # the LM kwargs that lay its streams out


def stream_shape(config: ModelConfig) -> tuple[int, int, int, int]:
    """(codebooks, predicted audio streams, card, text card) of the LM `config` builds, read from its
    kwargs or its checkpoint's config.json (no weights fetched or read): models scored on one set of
    streams must share them, which the evaluator checks before building any."""
    import inspect

    from moshi.models.lm import LMModel

    if config.is_tiny:
        kwargs = {**TINY_MOSHI_KWARGS, **config.tiny}
    else:
        config_path = checkpoint_files(config.name, config.given_files(), "config").get("config_path")
        if config_path is None:  # a legacy repo without config.json is Moshi-7B
            from .moshi.internals import moshi_7b_lm

            lm = moshi_7b_lm()
            return lm.num_codebooks, lm.dep_q, lm.card, lm.text_card
        # what moshi's loaders do with config.json: its entries are LMModel's kwargs, the rest defaults
        defaults = inspect.signature(LMModel).parameters
        kwargs = {key: defaults[key].default for key in STREAM_KWARGS} | read_config(config_path)
    return kwargs["n_q"] + 1, kwargs["dep_q"], kwargs["card"], kwargs["text_card"]


def load_lm(config: ModelConfig, device: torch.device | None = None):
    """The Moshi `LMModel` described by `config` (eval mode; on `device` or config.device); for host
    llama the transformers causal LM (`ttt_speech.llama.loading`).

    On the meta device: the architecture only, no weights read or allocated (sharded training
    builds it so on every rank but 0, and fills the shards from rank 0's copy)."""
    device = torch.device(device) if device is not None else config.torch_device()
    if config.is_llama:
        from .llama.loading import load_llm

        return load_llm(config, device)
    if config.is_tiny:
        return tiny_moshi_lm(seed=config.seed, device=device, dtype=config.torch_dtype(), **config.tiny)
    check_family(config)  # from config.json, before the weights are fetched or read
    return _checkpoint(config, "moshi_weights").get_moshi(device=device, dtype=config.torch_dtype(),
                                                          load_weight=device.type != "meta").eval()


def load_mimi(config: ModelConfig, device: torch.device | None = None):
    """The Mimi codec of `config`: for 'tiny' a seeded random-init Mimi whose codebooks are fitted
    so that its codes carry the audio (`ttt_speech/moshi/random_mimi.py`), the checkpoint's otherwise."""
    from moshi.models import loaders

    device = device or config.torch_device()
    if config.is_tiny:
        state = _random_mimi_state(config.seed)
        with torch.random.fork_rng(devices=[]):  # its init is overwritten: leave the caller's RNG alone
            mimi = loaders.get_mimi(None, device="cpu").eval()
        mimi.load_state_dict(state)
        return mimi.to(device)
    return _checkpoint(config, "mimi_weights").get_mimi(device=device).eval()


@functools.cache
def _random_mimi_state(seed: int) -> dict[str, torch.Tensor]:
    """The seeded random Mimi's weights with fitted codebooks (built once per process: ~2 s on a CPU)."""
    from moshi.models import loaders

    from .moshi.random_mimi import initialise_codebooks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, device="cpu").eval()
    initialise_codebooks(mimi, seed)
    return {k: v.clone() for k, v in mimi.state_dict().items()}


def load_text_tokenizer(config: ModelConfig):
    """The SentencePiece processor of the text stream: `text_tokenizer`, else the checkpoint's;
    None for the tiny model without one (its text stream can only be padding)."""
    import sentencepiece

    if config.text_tokenizer is not None:
        return sentencepiece.SentencePieceProcessor(model_file=str(config.text_tokenizer))
    if config.is_tiny:
        return None
    return _checkpoint(config, "tokenizer").get_text_tokenizer()


def _checkpoint(config: ModelConfig, reads: str):
    """moshi's `CheckpointInfo` of `config` for a load that `reads` "moshi_weights", "mimi_weights" or
    "tokenizer": every file resolved first (`ttt_speech/kyutai_files.py`: a folder's or the hub's, one
    line per failure), so that moshi fetches nothing itself."""
    from moshi.models import loaders

    files = checkpoint_files(config.name, config.given_files(), reads)
    if "config_path" not in files:  # legacy (Moshi-7B): what from_hf_repo builds for one (moshi 0.2.13)
        return loaders.CheckpointInfo(files["moshi_weights"], files["mimi_weights"], files["tokenizer"])
    return loaders.CheckpointInfo.from_hf_repo(config.name, **files)
