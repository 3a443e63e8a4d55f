"""Sample generations at each evaluation: greedy continuations of fixed prompts, to read beside the loss.

``--sample-prompt TEXT`` (repeatable) makes the loop call :func:`log_samples` after every evaluation.
Each prompt is encoded as `prep pack` encodes a document (the dataset's tokenizer, text only, the
dataset's BOS first when it has one) and continued greedily by the model being trained, through
``generate()``: one prompt at a time, which is the forward without boundaries that `train.attention`
allows. A continuation stops at the dataset's EOS or after ``--sample-tokens`` tokens. The samples go
to metrics.jsonl as ``{"step": N, "samples": [{"prompt", "completion", "num_tokens"}]}`` and to the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from shared.manifest import Manifest
from train.checkpoint import unwrap
from train.model import autocast_for
from train.tokenizer_files import TOKENIZER_JSON, dataset_tokenizer


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: str
    completion: str
    """The generated tokens decoded, special tokens (an EOS) included."""
    num_tokens: int


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    tokenizer,
    prompts: tuple[str, ...],
    *,
    max_new_tokens: int,
    eos_id: int,
    bos_id: int | None,
    device: torch.device,
) -> list[Sample]:
    """Greedy continuations of ``prompts`` by ``model`` (a `tokenizers.Tokenizer` encodes and decodes);
    the model's train/eval mode is restored afterwards."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    samples = []
    try:
        for prompt in prompts:
            ids = ([] if bos_id is None else [bos_id]) + tokenizer.encode(
                prompt, add_special_tokens=False
            ).ids
            input_ids = torch.tensor([ids], device=device)
            # Eager even under --compile: generation takes the layers' unpacked path (a KV cache, no
            # boundaries), which training does not compile; a few samples do not repay compiling it.
            with autocast_for(device), torch.compiler.set_stance("force_eager"):
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos_id,
                    pad_token_id=eos_id,
                    use_cache=True,
                )
            new = out[0, len(ids) :].tolist()
            samples.append(Sample(prompt, tokenizer.decode(new, skip_special_tokens=False), len(new)))
    finally:
        model.train(was_training)
    return samples


def log_samples(run, step: int) -> None:
    """After the evaluation of ``step``: the run's sample generations, recorded and logged (rank 0)."""
    cfg = run.cfg
    if not cfg.sample_prompt or not run.is_main:
        return
    folder = dataset_tokenizer(cfg.data)
    if folder is None:
        run.say(
            f"samples skipped at step {step:,}: the tokenizer named by `{cfg.data}`'s manifest is not there"
            " (or changed since packing)"
        )
        return
    from tokenizers import Tokenizer

    info = Manifest.load(cfg.data).tokenizer
    samples = generate_samples(
        run.model,
        Tokenizer.from_file(str(folder / TOKENIZER_JSON)),
        cfg.sample_prompt,
        max_new_tokens=cfg.sample_tokens,
        eos_id=info.eos_id,
        bos_id=info.bos_id,
        device=run.device,
    )
    run.record({"step": step, "kind": "samples", "samples": [asdict(s) for s in samples]})
    for s in samples:
        run.say(f"sample step {step:,} | {s.prompt!r} -> {s.completion!r}")
