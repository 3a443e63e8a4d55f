"""`RunConfig`: every option of `train run`, validated once, loadable from a TOML file with CLI overrides.

Precedence is defaults < ``--config run.toml`` < flags given on the command line. The TOML file holds
the same names as the flags, with ``-`` or ``_`` (``batch-size = 8`` or ``batch_size = 8``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import UserError
from train.attention import ATTN_CHOICES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

VERIFY_CHOICES = ("checksum", "size")
DTYPE_CHOICES = ("auto", "bf16", "fp32", "fp16")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


class ConfigError(UserError):
    """An option of `train run` or `train plan` is invalid or missing."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    data: Path
    """Packed dataset folder (`prep pack --out`); its `train` split is trained on."""
    model: str
    """A Hugging Face model folder, or `tiny-qwen2` (a small built-in Qwen2 config, random weights)."""
    out: Path
    """Run folder: metrics.jsonl, loss.png, checkpoints/, adapter/ (or model/ without LoRA)."""
    token_budget: int | None = None
    """Run length in tokens of capacity: steps = floor(budget / tokens per step). Or give max_steps."""
    max_steps: int | None = None
    """Run length in optimizer steps (instead of token_budget)."""
    batch_size: int = 8
    """Packed rows per micro-batch (one flat stream of up to batch_size * seq_len tokens)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from zero."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_data: tuple[tuple[str, Path], ...] = ()
    """Named eval sets (``--eval-data NAME=PATH``, repeatable): packed datasets, each read from its `val`
    split if it has one, else `train`. --data's own `val` split is always the set `val` unless an eval
    set takes that name (a PATH without NAME= does, as before eval sets had names)."""
    eval_every: int = 100
    """Evaluate at step 0, every this many steps and after the last; 0 disables evaluation."""
    eval_max_tokens: int | None = None
    """Evaluate each set's leading rows up to and including the one that reaches this many tokens
    (as `train eval --max-tokens`); default every row."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    resume: bool = False
    """Continue from the newest complete checkpoint under out/checkpoints."""
    attn: str = "auto"
    """Attention kernel: auto, flash_attn, torch_varlen or sdpa."""
    lora: bool = True
    """Train a LoRA adapter (peft); False trains every weight."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the torchrun ranks (FSDP2); full fine-tuning only."""
    lora_r: int = 32
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA scaling numerator (scale = alpha / r)."""
    seed: int = 0
    """Seeds the weights of a built-in model, LoRA init, the data order and dropout."""
    device: str = "auto"
    """auto (cuda, else mps, else cpu; refused when a GPU is present that torch cannot use), cpu, cuda,
    cuda:N or mps."""
    dtype: str = "auto"
    """Compute precision: bf16 (autocast; frozen LoRA base weights stored in bf16), fp32, or auto (bf16
    on a CUDA GPU that supports it, else fp32). fp16 is refused: it needs loss scaling the loop lacks."""
    grad_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them: less memory
    (see `train plan --model`) for one more forward of each layer per step; the same loss and gradients."""
    compile: bool = False
    """Compile each decoder layer with torch.compile (inductor, dynamic shapes): fused kernels for norms,
    rotary and activations; the first step (and the first eval) pay the compile time. The same loss and
    gradients up to float rounding. Needs Triton on CUDA or a C++ compiler on the CPU."""
    init_adapter: Path | None = None
    """Start from a trained LoRA adapter (an adapter folder, a run folder or a checkpoint): its weights
    are loaded, the optimizer and schedule start fresh at step 0."""
    keep_checkpoints: int = 0
    """Keep only the newest this many checkpoints (0 keeps all); the one resumed from is never deleted."""
    verify: str = "checksum"
    """How shards are checked before training: checksum (sha256 of every byte) or size."""
    log_every: int = 1
    """Print one log line every this many steps."""
    tensorboard: bool | None = None
    """Log to TensorBoard (OUT/tensorboard/); None: when the `tensorboard` package is installed."""
    wandb: bool = False
    """Log to Weights & Biases (`wandb` package; project $WANDB_PROJECT, WANDB_MODE=offline works)."""
    sample_prompt: tuple[str, ...] = ()
    """Prompts continued greedily after every evaluation, logged and recorded (`train.samples`)."""
    sample_tokens: int = 32
    """Most new tokens per sample generation."""

    def __post_init__(self) -> None:
        if (self.token_budget is None) == (self.max_steps is None):
            raise ConfigError(
                "give exactly one of `--token-budget` and `--max-steps`"
                f" (got token_budget={self.token_budget}, max_steps={self.max_steps})."
            )
        _positive("--token-budget", self.token_budget)
        _positive("--max-steps", self.max_steps)
        _positive("--batch-size", self.batch_size)
        _positive("--grad-accum", self.grad_accum)
        _positive("--lora-r", self.lora_r)
        _positive("--lora-alpha", self.lora_alpha)
        _positive("--log-every", self.log_every)
        _positive("--eval-max-tokens", self.eval_max_tokens)
        if self.keep_checkpoints < 0:
            raise ConfigError(
                f"--keep-checkpoints {self.keep_checkpoints} must not be negative (0 keeps all)."
            )
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be positive.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio {self.min_lr_ratio} must be in [0, 1].")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1).")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"--weight-decay {self.weight_decay} and --grad-clip {self.grad_clip} must not be negative."
            )
        if self.eval_every < 0 or self.save_every < 0:
            raise ConfigError(
                f"--eval-every {self.eval_every} and --save-every {self.save_every} must not be negative"
                " (0 turns them off)."
            )
        if self.fsdp and self.lora:
            raise ConfigError(
                "--fsdp shards full fine-tuning; add --no-lora (LoRA runs keep a replica of the frozen"
                " model on every rank and sum only the adapter's gradients), or drop --fsdp."
            )
        if self.compile and self.fsdp:
            raise ConfigError(
                "--compile with --fsdp is not supported yet (FSDP2's hooks around each compiled layer are"
                " untested here); drop one of them."
            )
        if self.attn not in ATTN_CHOICES:
            raise ConfigError(f"--attn {self.attn!r} is unknown; choose one of {', '.join(ATTN_CHOICES)}.")
        if self.verify not in VERIFY_CHOICES:
            raise ConfigError(
                f"--verify {self.verify!r} is unknown; choose one of {', '.join(VERIFY_CHOICES)}."
            )
        if not isinstance(self.eval_data, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Path)
            for p in self.eval_data
        ):
            raise ConfigError(
                f"eval_data {self.eval_data!r} must be (name, Path) pairs; on the command line"
                " --eval-data NAME=PATH (repeatable)."
            )
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device!r} is unknown; use {DEVICE_HELP}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPE_CHOICES)}.")
        if self.dtype == "fp16":
            raise ConfigError(
                "--dtype fp16 is not supported: fp16's 5-bit exponent underflows small gradients unless the"
                " loss is scaled (a GradScaler), which this loop does not do. Use --dtype bf16 where the GPU"
                " has it (NVIDIA Ampere or newer), or --dtype fp32."
            )
        if self.init_adapter is not None and not self.lora:
            raise ConfigError(
                "--init-adapter loads a LoRA adapter, but this run trains every weight (--no-lora); to"
                " continue a full fine-tune, pass its exported model folder (RUN/model) as --model."
            )
        self._check_samples()

    def _check_samples(self) -> None:
        prompts = self.sample_prompt
        if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
            raise ConfigError(
                f"--sample-prompt {prompts!r} must be non-empty texts (a list of strings in a --config file)."
            )
        object.__setattr__(self, "sample_prompt", tuple(prompts))  # a TOML list, kept hashable
        _positive("--sample-tokens", self.sample_tokens)
        if prompts and self.fsdp:
            raise ConfigError(
                "--sample-prompt generates on rank 0 alone, which a model sharded with --fsdp cannot do;"
                " drop --sample-prompt, or export a checkpoint (`train export`) and generate with that."
            )


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value} must be at least 1.")


def named_paths(
    values: list[str] | tuple[str, ...], flag: str, *, bare_name: str | None = None
) -> tuple[tuple[str, Path], ...]:
    """``NAME=PATH`` values as (name, path) pairs; a bare PATH is named ``bare_name`` (default: the
    folder's name). Names must differ."""
    pairs = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{flag} {value!r} must be a string NAME=PATH (a packed dataset folder).")
        name, sep, path = value.partition("=")
        if not sep:
            name, path = bare_name or Path(value).name, value
        if not path or not valid_name(name):
            raise ConfigError(
                f"{flag} {value!r}: give NAME=PATH with a NAME of letters, digits, `_`, `-` or `.`"
                " (it names the set in the log, the table and the JSON)."
            )
        pairs.append((name, Path(path)))
    names = [name for name, _ in pairs]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{flag}: the name {duplicated[0]!r} is given twice; each set needs its own name.")
    return tuple(pairs)


def valid_name(name: str) -> bool:
    """A set's or row's name: letters, digits, `_`, `-` or `.`, not starting with a digit."""
    return bool(name) and name.replace("-", "_").replace(".", "_").isidentifier()


def named_model(value: str | None) -> tuple[str | None, str | None]:
    """``--model NAME=PATH`` as (NAME, PATH); a bare PATH (or `tiny-qwen2`) as (None, PATH). A PATH that
    holds `=` itself is read as a bare PATH unless what comes before the `=` is a name."""
    if value is None:
        return None, None
    name, sep, path = value.partition("=")
    if not sep or not valid_name(name):
        return None, value
    if not path:
        raise ConfigError(f"--model {value!r}: give NAME=PATH, a model folder after the `=`.")
    return name, path


def field_types() -> dict[str, type]:
    """RunConfig's field -> the type a value must have (``int | None`` -> ``int``)."""
    hints = typing.get_type_hints(RunConfig)
    kinds = {}
    for name, hint in hints.items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kinds[name] = hint
    return kinds


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    Path: "a path string",
}


def typed_value(key: str, value: Any, kind: Any, source: str) -> Any:
    """``value`` from a TOML file as RunConfig's field type ``kind``; a ConfigError naming ``key`` if
    it is not of that type (TOML has types: ``batch-size = "8"`` is a string, not 8). A ``tuple[X, ...]``
    or ``list[X]`` field takes a TOML array of X."""
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` must be an array (`{key} = [...]`), not {value!r}.")
        item = typing.get_args(kind)[0]
        return origin(typed_value(f"{key}[{i}]", v, item, source) for i, v in enumerate(value))
    if kind not in _TYPE_WORDS:  # a field type this reader does not know: let RunConfig judge the value
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }[kind]
    if not ok:
        hint = ""
        if kind is bool:
            hint = f" Write `{key} = true` or `{key} = false` (no quotes)."
        elif isinstance(value, str) and kind in (int, float):
            hint = f" Write it without quotes: `{key} = {value}`."
        elif kind is int and isinstance(value, float):
            hint = " Give a whole number."
        raise ConfigError(
            f"{source}: `{key}` must be {_TYPE_WORDS[kind]}, not {type(value).__name__} {value!r}.{hint}"
        )
    if kind is Path:
        return Path(value)
    return float(value) if kind is float else value


def load_toml(path: Path) -> dict[str, Any]:
    """The options in a TOML file, keyed by RunConfig field name; unknown keys are an error."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config `{path}` does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config `{path}` is not valid TOML ({e}).") from None
    kinds = field_types()
    source = f"--config `{path}`"
    options = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "no_lora":
            name, value = "lora", not typed_value(key, value, bool, source)
        if name not in kinds:
            raise ConfigError(
                f"{source}: unknown option `{key}`; valid options are {', '.join(sorted(kinds))}."
            )
        if name == "eval_data":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(
                    f'--config `{path}`: `{key}` is {value!r}; give a list of "NAME=PATH" strings'
                    ' (eval-data = ["fin=packed/fin", "news=packed/news"]).'
                )
            value = named_paths(value, f"--config `{path}`: `{key}`", bare_name="val")
        else:
            value = typed_value(key, value, kinds[name], source)
        options[name] = value
    return options


def build_run_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults, then the TOML file, then every flag that was given (``None`` means "not given")."""
    options = load_toml(config_file) if config_file is not None else {}
    options.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(options.get("eval_data"), list):  # the command line's NAME=PATH strings
        options["eval_data"] = named_paths(options["eval_data"], "--eval-data", bare_name="val")
    missing = [f"--{name.replace('_', '-')}" for name in ("data", "model", "out") if name not in options]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: give them as flags or in --config.")
    try:
        return RunConfig(**options)
    except TypeError as e:
        raise ConfigError(f"bad option ({e}).") from None
