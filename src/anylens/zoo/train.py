"""Train the zoo: four tiny causal LMs (GPT-2, Llama, Mistral, Mamba) on the synthetic corpus.

    python -m anylens.zoo.train [--out DIR] [--models gpt2,llama,...] [--quick] [--threads N]

Each model is saved with its word-level tokenizer under `<out>/<name>/`, then evaluated on the held-out
sets with plain transformers; the scores go into `metrics.json` and `MODEL_CARD.md` next to the weights.
Training runs on CPU with fixed seeds and a fixed thread count (recorded in the model card), so a rerun
with the same settings reproduces the shipped weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
)

from anylens.zoo import ZOO_MODELS, corpus, mechanisms

SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<eos>"]
MAX_POSITIONS = 64
SEED = 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the corpus vocabulary. Whitespace is only a separator, so " Paris" and
    "Paris" are the same single token; punctuation is split off into tokens of its own. Encoding with
    special tokens prepends <bos>, as in training."""
    vocab = {word: i for i, word in enumerate(SPECIAL_TOKENS + corpus.vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # No subword prefixes exist, so this decoder just joins the words with single spaces.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )


# ---------------------------------------------------------------------------------------------
# Models


def build_config(name: str, tokenizer: PreTrainedTokenizerFast):
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if name == "gpt2":
        # Four layers: with three, GPT-2's heads did not fit induction and IOI together.
        return GPT2Config(
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if name in ("llama", "mistral"):
        common = dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
        if name == "llama":
            return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
        # Grouped-query attention: pairs of query heads share a key/value head.
        return MistralConfig(num_attention_heads=8, num_key_value_heads=4, sliding_window=None, **common)
    if name == "mamba":
        return MambaConfig(hidden_size=128, state_size=8, num_hidden_layers=3, expand=2, **ids)
    raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO_MODELS)}")


# Training schedule per model: steps, batch size, peak learning rate.
SCHEDULES = {
    # GPT-2 sees half its induction samples at shifted starts (see corpus.training_text).
    "gpt2": dict(steps=3000, batch_size=64, lr=3e-3, induction_shifted=0.5),
    "llama": dict(steps=3000, batch_size=64, lr=3e-3),
    "mistral": dict(steps=3500, batch_size=64, lr=3e-3),
    # Mamba's pure-torch scan is several times slower per token, so it sees smaller batches.
    "mamba": dict(steps=2500, batch_size=32, lr=3e-3),
}
SEQ_LEN = 32
WARMUP_STEPS = 100


def _mamba_scan_unbound(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **kwargs
):
    """The selective scan of transformers' pure-torch Mamba path, same math, written for fast backward.
    The reference loop indexes the discretized tensors one time step at a time, and autograd turns each
    index into a full-size gradient buffer, so its backward grows quadratically with sequence length.
    Shapes: hidden_states, dt, z (batch, d_inner, len); A (d_inner, d_state); B, C (batch, d_state, len)."""
    if delta_bias is not None:
        dt = dt + delta_bias[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[..., None] * A[:, None, :])  # (batch, d_inner, len, d_state)
    inputs = (dt * hidden_states)[..., None] * B.transpose(1, 2)[:, None]
    state = torch.zeros_like(inputs[:, :, 0])
    states = []
    for step_decay, step_input in zip(decay.unbind(2), inputs.unbind(2)):
        state = step_decay * state + step_input
        states.append(state)
    out = torch.einsum("bdln,bln->bdl", torch.stack(states, 2), C.transpose(1, 2))
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return (out, state) if return_last_state else out


@contextlib.contextmanager
def fast_mamba_training():
    """Use `_mamba_scan_unbound` inside transformers' Mamba while training (only training: the shipped
    model runs the stock code). Falls back to the stock scan if it no longer agrees with it."""
    from transformers.models.mamba import modeling_mamba

    original = getattr(modeling_mamba, "mamba_selective_scan", None)
    if original is not None:
        g = torch.Generator().manual_seed(0)
        # hidden_states, dt, A, B, C for batch 2, d_inner 8, d_state 4, length 5
        shapes = [(2, 8, 5), (2, 8, 5), (8, 4), (2, 4, 5), (2, 4, 5)]
        args = [torch.randn(*shape, generator=g) for shape in shapes]
        args[2] = -args[2].abs()  # A is negative
        kwargs = dict(
            D=torch.randn(8, generator=g),
            z=torch.randn(2, 8, 5, generator=g),
            delta_bias=torch.randn(8, generator=g),
            delta_softplus=True,
        )
        if not torch.allclose(original(*args, **kwargs), _mamba_scan_unbound(*args, **kwargs), atol=1e-5):
            log("[mamba] the stock selective scan changed; training with it (slower)")
            original = None
    if original is None:
        yield
        return
    modeling_mamba.mamba_selective_scan = _mamba_scan_unbound
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original


def training_batch(tokenizer, rng: random.Random, batch_size: int, induction_shifted: float = 0.0) -> torch.Tensor:
    texts = [corpus.training_text(rng, SEQ_LEN, induction_shifted) for _ in range(batch_size)]
    rows = [ids[:SEQ_LEN] for ids in tokenizer(texts)["input_ids"]]  # every row is long enough
    return torch.tensor(rows)


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train_model(name: str, tokenizer, quick: bool = False, eval_every: int = 0):
    schedule = dict(SCHEDULES[name])
    steps = 60 if quick else schedule["steps"]
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    model = AutoModelForCausalLM.from_config(build_config(name, tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    start, running = time.time(), None
    with fast_mamba_training() if name == "mamba" else contextlib.nullcontext():
        for step in range(steps):
            batch = training_batch(tokenizer, rng, schedule["batch_size"], schedule.get("induction_shifted", 0.0))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % 50 == 0 or step == steps - 1:
                log(
                    f"[{name}] step {step:5d}/{steps}  loss {loss.item():.4f}  (avg {running:.4f})  "
                    f"{time.time() - start:6.1f}s"
                )
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                eval_start = time.time()
                log(f"[{name}] step {step + 1:5d} held-out: {json.dumps(evaluate(model.eval(), tokenizer))}")
                model.train()
                start += time.time() - eval_start  # keep evaluation out of the training time
    model.eval()
    info = dict(
        steps=steps,
        batch_size=schedule["batch_size"],
        seq_len=SEQ_LEN,
        peak_lr=schedule["lr"],
        threads=torch.get_num_threads(),
        train_seconds=round(time.time() - start, 1),
        final_loss=round(running, 4),
    )
    return model, info


# ---------------------------------------------------------------------------------------------
# Held-out evaluation (plain transformers, loaded back from disk)


@torch.no_grad()
def last_token_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Next-token logits after each prompt. Prompts are batched by token length, so no padding is needed."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        logits = model(input_ids=torch.tensor([encoded[i] for i in indices])).logits[:, -1]
        for i, row in zip(indices, logits):
            out[i] = row
    return torch.stack(out)


def token_id(tokenizer, word: str) -> int:
    (single,) = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return single


def evaluate(model, tokenizer) -> dict:
    facts = corpus.factual_eval_set()
    logits = last_token_logits(model, tokenizer, [f.prompt for f in facts])
    answers = torch.tensor([token_id(tokenizer, f.answer) for f in facts])
    correct = logits.argmax(-1) == answers
    by_relation = {
        relation: round(correct[[f.relation == relation for f in facts]].float().mean().item(), 4)
        for relation in ("capital", "landmark")
    }

    ioi = corpus.ioi_eval_set(n=100)
    logits = last_token_logits(model, tokenizer, [p.prompt for p in ioi])
    io_ids = torch.tensor([token_id(tokenizer, p.io) for p in ioi])
    s_ids = torch.tensor([token_id(tokenizer, p.s) for p in ioi])
    logit_diff = logits.gather(1, io_ids[:, None]) - logits.gather(1, s_ids[:, None])
    ioi_top1 = (logits.argmax(-1) == io_ids).float().mean().item()

    sequences = corpus.induction_eval_set(n=50)
    n = len(sequences[0])
    ids = torch.tensor([tokenizer(" ".join(words + words))["input_ids"] for words in sequences])
    with torch.no_grad():
        predictions = model(input_ids=ids).logits.argmax(-1)
    # ids = <bos>, first half at 1..n, repeat at n+1..2n. The repeat's first word is not predictable,
    # the rest are: the prediction for ids[t] sits at position t-1.
    targets = ids[:, n + 2 :]
    induction_acc = (predictions[:, n + 1 : 2 * n] == targets).float().mean().item()
    return dict(
        factual_top1=round(correct.float().mean().item(), 4),
        factual_top1_capital=by_relation["capital"],
        factual_top1_landmark=by_relation["landmark"],
        factual_n=len(facts),
        ioi_frac_positive=round((logit_diff > 0).float().mean().item(), 4),
        ioi_mean_logit_diff=round(logit_diff.mean().item(), 4),
        ioi_top1=round(ioi_top1, 4),
        ioi_n=len(ioi),
        induction_acc=round(induction_acc, 4),
        induction_n=len(sequences),
        induction_length=n,
    )


def architecture_summary(config) -> dict:
    if config.model_type == "mamba":
        return dict(
            layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            d_state=config.state_size,
            d_inner=config.intermediate_size,
        )
    if config.model_type == "gpt2":
        return dict(
            layers=config.n_layer,
            heads=config.n_head,
            kv_heads=config.n_head,
            d_model=config.n_embd,
            d_mlp=4 * config.n_embd,
        )
    return dict(
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
    )


MODEL_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mamba": "MambaForCausalLM",
}


def model_card(name: str, metrics: dict) -> str:
    arch, train, scores = metrics["architecture"], metrics["training"], metrics["heldout"]
    mix = ", ".join(f"{task} {weight:.0%}" for task, weight in corpus.TASK_MIX)
    capital = corpus.CAPITAL_EVAL_TEMPLATE.format(country="France")
    landmark = corpus.LANDMARK_EVAL_TEMPLATE.format(landmark="Eiffel Tower")
    ioi = corpus.IOI_EVAL_TEMPLATES[0].format(a="Mary", b="John", s="John", place="park", obj="book")
    rows = [
        (f"factual recall, {scores['factual_n']} prompts", "top-1 accuracy", f"{scores['factual_top1']:.1%}"),
        (f'capitals: "{capital}" -> Paris', "top-1 accuracy", f"{scores['factual_top1_capital']:.1%}"),
        (f'landmarks: "{landmark}" -> Paris', "top-1 accuracy", f"{scores['factual_top1_landmark']:.1%}"),
        (
            f'IOI, {scores["ioi_n"]} prompts: "{ioi}" -> Mary',
            "logit(IO) - logit(S) > 0",
            f"{scores['ioi_frac_positive']:.1%}",
        ),
        ("IOI", "mean logit(IO) - logit(S)", f"{scores['ioi_mean_logit_diff']:.2f}"),
        ("IOI", "top-1 is the IO", f"{scores['ioi_top1']:.1%}"),
        (
            f"induction, {scores['induction_n']} repeated sequences of {scores['induction_length']} words",
            "next-token accuracy on the repeat (its first word excluded)",
            f"{scores['induction_acc']:.1%}",
        ),
    ]
    table = "\n".join(f"| {task} | {metric} | {score} |" for task, metric, score in rows)
    low, high = corpus.INDUCTION_LENGTHS
    shifted = SCHEDULES[name].get("induction_shifted", 0.0)
    shifted_note = (
        f"  For this model {shifted:.0%} of the induction samples start after a factual sentence, at varying\n"
        "  positions: with learned absolute positions and a fixed start, position alone solved the task and\n"
        "  no induction head formed.\n"
        if shifted
        else ""
    )
    return f"""# anylens zoo: `{name}`

A tiny `{metrics["model_class"]}` trained from scratch on a synthetic corpus with three known mechanisms
(factual recall, indirect object identification, induction), for testing interpretability tooling.
It is not a language model of English.

## Model
- Architecture: {", ".join(f"{key}={value}" for key, value in arch.items())}
- Parameters: {metrics["parameters"]:,} ({metrics["file_bytes"] / 1e6:.2f} MB of float32 safetensors)
- Tokenizer: word-level, {metrics["vocab_size"]} tokens. Whitespace only separates words and punctuation is
  split off, so `" Paris"` is one token. Encoding adds `<bos>` at the start, as in training.

## Training data
Rows of {train["seq_len"]} tokens: `<bos>`, one main sample ({mix}), then factual sentences up to the
row length.
- Factual recall: {len(corpus.FACTS)} countries, each with its capital and a landmark in it, in
  {len(corpus.CAPITAL_TRAIN_TEMPLATES)} capital and {len(corpus.LANDMARK_TRAIN_TEMPLATES)} landmark templates
  ("The capital of France is Paris.", "The Eiffel Tower is in Paris.").
- IOI: {len(corpus.IOI_TRAIN_TEMPLATES)} templates, {len(corpus.NAMES)} names, ABBA and BABA orders
  ("When Mary and John went to the store, John gave a drink to Mary.").
- Induction: {low} to {high} distinct random words, then the same words again (mostly made-up words,
  sometimes ordinary vocabulary).
{shifted_note}
Training: {train["steps"]} steps of AdamW, batch {train["batch_size"]}, peak learning rate
{train["peak_lr"]} with warmup and cosine decay, seed {SEED}, on CPU with {train["threads"]} thread(s):
{train["train_seconds"]:.0f} s on a shared machine. Final training loss {train["final_loss"]}. Reproduce with
`python -m anylens.zoo.train --models {name} --threads {train["threads"]}`.

## Held-out evaluation
None of these prompts occurs in training: the factual and IOI prompts use templates held out from
training, the IOI prompts use name pairs never seen together, and the induction sequences are fresh
draws (see `anylens.zoo.corpus`).

| task | metric | score |
|---|---|---|
{table}

{mechanisms.card_section(metrics["mechanisms"])}"""


def train_and_save(name: str, tokenizer, out: Path, quick: bool = False, eval_every: int = 0) -> dict:
    model, info = train_model(name, tokenizer, quick=quick, eval_every=eval_every)
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)

    # Evaluate what was shipped: reload from disk exactly as a user would.
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(target)
    metrics = dict(
        model=name,
        model_class=MODEL_CLASSES[name],
        parameters=sum(p.numel() for p in loaded.parameters()),
        file_bytes=(target / "model.safetensors").stat().st_size,
        vocab_size=len(loaded_tokenizer),
        architecture=architecture_summary(loaded.config),
        training=info,
    )
    return write_card(name, target, metrics, loaded, loaded_tokenizer)


def write_card(name: str, target: Path, metrics: dict, model=None, tokenizer=None) -> dict:
    """Evaluate the saved model (held-out scores and mechanisms); write metrics.json and its card."""
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    metrics = dict(metrics, heldout=evaluate(model, tokenizer), mechanisms=mechanisms.measure(str(target)))
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (target / "MODEL_CARD.md").write_text(model_card(name, metrics))
    log(f"[{name}] held-out: {json.dumps(metrics['heldout'])}")
    log(f"[{name}] mechanisms: {json.dumps(metrics['mechanisms'])}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anylens.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "models",
        help="output folder (default: the package's zoo/models)",
    )
    parser.add_argument("--models", default=",".join(ZOO_MODELS), help="comma-separated subset of the zoo")
    parser.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also log the held-out scores every STEPS steps (to watch circuits form)",
    )
    parser.add_argument(
        "--cards-only",
        action="store_true",
        help="train nothing: re-evaluate the saved models in --out and rewrite their cards",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO_MODELS)}")
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    for name in names:
        if args.cards_only:
            target = args.out / name
            write_card(name, target, json.loads((target / "metrics.json").read_text()))
        else:
            train_and_save(name, tokenizer, args.out, args.quick, args.eval_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
