#!/usr/bin/env python3
"""Train the small Mixtral-architecture demo MoE that ships in ``mobilemoe/demo_model``.

The point of this model is that a newcomer's first command runs a *real*, trained
Mixture-of-Experts (not random weights) whose experts visibly specialise.  To make the
specialisation easy to see, it is trained on two very different, freely redistributable
text domains:

* prose: the King James Bible (public domain), as printed by Debian's ``bible``
  program from the ``bible-kjv-text`` package (``apt-get install bible-kjv-text``);
* code:  the ``.py`` sources of the Python standard library that runs this script
  (PSF licence), without test suites and generated/data-like modules.

Pipeline (all deterministic for a given ``--seed``):

1. build the two corpora and hold out part of each (held-out split chosen by a
   seed-independent rule so it is stable across seeds); write ~30 KB held-out samples to
   ``tools/heldout/{prose,code}.txt``;
2. train a byte-level BPE tokenizer (``tokenizers``) on the training split only;
3. train ``transformers.MixtralForCausalLM`` (8 experts, top-2, a load-balancing aux loss
   per layer) on CPU with one thread, AdamW + linear warm-up + cosine decay;
4. report held-out perplexity per domain (float32), top-1 routing fractions per layer
   and domain and each expert's load, then save the model in bfloat16 together with the tokenizer and re-check
   perplexity and greedy samples of the saved bf16 model.

Reproduce the shipped model with::

    .venv/bin/python tools/train_demo_model.py --seed 0 --out mobilemoe/demo_model

The result is a tiny text-continuation model; it does not follow instructions.
"""

from __future__ import annotations

import os

# Keep every library to a single core *before* they are imported: the machine this runs on
# is shared, and single-threaded execution also keeps the run bit-for-bit reproducible.
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' Rust thread pool
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import random
import re
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

REPO_ROOT = Path(__file__).resolve().parent.parent

# Llama/Mixtral-style special tokens; ids 0..3 in this order.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]

# `bible -f` prints one verse per line as "<Book><chapter>:<verse> <text>", e.g. "1Sm3:4 ...".
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")

# Parts of the stdlib that are not representative hand-written Python (test suites, the IDLE
# app, 2to3 fixer data, codec tables, generated pydoc topics, vendored wheels, build config).
STDLIB_EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3",
    "encodings", "pydoc_data", "ensurepip", "turtledemo", "__pycache__", "lib-dynload",
    "__phello__",
}

PROMPTS = {
    "prose": ["In the beginning", "And Jesus said unto them,"],
    # No trailing newline: the ByteLevel split glues "\n" to the following indentation, so a
    # prompt ending in a bare "\n" tells the model the next line is *not* indented.
    "code": ["def main(", "class Stack:\n    def push(self, item):"],
}


# --------------------------------------------------------------------------- arguments


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch sampling")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "mobilemoe" / "demo_model",
                   help="output folder for the bf16 model + tokenizer")
    p.add_argument("--heldout-dir", type=Path, default=REPO_ROOT / "tools" / "heldout",
                   help="where to write the held-out samples prose.txt / code.txt")
    p.add_argument("--report", type=Path, default=Path("/tmp/demo_model_report.json"),
                   help="JSON file with all measured numbers (kept outside the repo)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the training step (~1.3-1.5x faster on CPU, ~90 s to compile)")
    # data
    p.add_argument("--prose-holdout-every", type=int, default=20,
                   help="hold out every N-th Bible chapter")
    p.add_argument("--heldout-sample-bytes", type=int, default=30_000,
                   help="approximate size of each tools/heldout/*.txt sample")
    p.add_argument("--vocab-size", type=int, default=4096)
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=320, help="per-expert FFN size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256, help="training context = max positions")
    p.add_argument("--aux-coef", type=float, default=0.04,
                   help="weight of the per-layer-mean load-balancing loss (0.04 on the mean of "
                        "4 layers = Switch Transformer's 0.01 per layer)")
    # optimisation
    p.add_argument("--steps", type=int, default=1800,
                   help="~35 min at ~1.7-2k tok/s on one shared Xeon core with --compile")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (half prose, half code)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--sample-tokens", type=int, default=60, help="greedy tokens per sample")
    return p.parse_args()


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # warn_only: a few ops have no deterministic CPU kernel flag even though they are
    # deterministic single-threaded; we want a warning, not a crash, if one shows up.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Inductor otherwise compiles in a pool of worker processes on every core.
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1


def stable_hash(text: str) -> str:
    """Seed-independent ordering key, so the held-out split never depends on --seed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- corpora


@dataclass
class Doc:
    name: str  # chapter id ("Ge1") or stdlib-relative path
    text: str


def load_kjv_chapters() -> list[Doc]:
    """Whole KJV, one Doc per chapter, verse references stripped, one verse per line."""
    try:
        raw = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise SystemExit("the `bible` program is missing: apt-get install bible-kjv-text") from e
    chapters: dict[str, list[str]] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if m is None:
            raise ValueError(f"unexpected line from `bible`: {line[:80]!r}")
        book, chap, _verse, text = m.groups()
        # References like "Ge1:1" would be ~8% of the bytes and pure noise for a language
        # model; the double spaces after some sentences are typesetting artefacts.
        chapters.setdefault(f"{book}{chap}", []).append(re.sub(r" {2,}", " ", text.strip()))
    return [Doc(name, "\n".join(verses) + "\n") for name, verses in chapters.items()]


def load_stdlib_files() -> list[Doc]:
    """Python stdlib .py sources (without tests/IDLE/codec tables), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Doc] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = set(rel.parts[:-1])
        if parts & STDLIB_EXCLUDED_DIRS or any(p.startswith("config-") for p in parts):
            continue
        if rel.name.startswith("_sysconfigdata"):  # machine-specific generated dict
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n")
        if text.strip():
            docs.append(Doc(rel.as_posix(), text))
    return docs


def nbytes(docs: list[Doc]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)


def split_prose(chapters: list[Doc], every: int) -> tuple[list[Doc], list[Doc]]:
    """Every N-th chapter (offset N//2, spread over the whole Bible) is held out."""
    held = [c for i, c in enumerate(chapters) if i % every == every // 2]
    train = [c for i, c in enumerate(chapters) if i % every != every // 2]
    return train, held


def split_code(files: list[Doc], heldout_bytes: int, train_bytes: int) -> tuple[list[Doc], list[Doc]]:
    """Hold out whole files, then cap the training files so both domains are equally big.

    Files are visited in sha256(path) order, a fixed pseudo-random order that does not depend
    on --seed.  Held-out and training sets are returned sorted by path.
    """
    order = sorted(files, key=lambda d: stable_hash(d.name))
    held: list[Doc] = []
    train: list[Doc] = []
    held_n = train_n = 0
    for d in order:
        size = len(d.text.encode("utf-8"))
        if held_n < heldout_bytes:
            held.append(d)
            held_n += size
        elif train_n < train_bytes:
            train.append(d)
            train_n += size
    return sorted(train, key=lambda d: d.name), sorted(held, key=lambda d: d.name)


def heldout_sample(docs: list[Doc], target_bytes: int, min_doc: int = 0, max_doc: int = 10**9) -> str:
    """A ~target_bytes sample of whole held-out docs, spread over the held-out set."""
    pool = [d for d in docs if min_doc <= len(d.text.encode("utf-8")) <= max_doc] or docs
    avg = max(1, nbytes(pool) // len(pool))
    stride = max(1, len(pool) // max(1, target_bytes // avg))
    picked: list[str] = []
    size = 0
    for d in pool[::stride] + pool:  # second pass only if the strided pass was too small
        if size >= target_bytes:
            break
        if d.text in picked:
            continue
        picked.append(d.text)
        size += len(d.text.encode("utf-8"))
    return "\n".join(picked)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[Doc], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is representable, so text (incl. whitespace) round-trips."""
    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False: a leading space would change the text on decode.  The GPT-2
    # split regex keeps runs of spaces together, so Python indentation becomes few tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    # Prepend <s> like Llama/Mixtral tokenizers, matching the "<s> doc </s>" training layout.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def wrap_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )


def check_roundtrip(tok: Tokenizer, samples: list[str]) -> None:
    for s in samples:
        ids = tok.encode(s).ids
        back = tok.decode(ids, skip_special_tokens=True)
        if back != s:
            raise AssertionError(f"tokenizer does not round-trip: {s[:60]!r} -> {back[:60]!r}")


def encode_stream(tok: Tokenizer, docs: list[Doc]) -> torch.Tensor:
    """Concatenate docs as "<s> doc </s> <s> doc </s> ..." into one int64 token stream."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, vocab_size: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.seq_len,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        tie_word_embeddings=False,
        sliding_window=None,
        attention_dropout=0.0,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=False,  # switched on explicitly in the training forward pass
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    # grouped_mm was ~10% faster than the eager per-expert loop in a 1-thread CPU benchmark.
    return MixtralForCausalLM._from_config(config, experts_implementation="grouped_mm",
                                           attn_implementation="sdpa", dtype=torch.float32)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    # Per token only top_k of num_experts expert FFNs run.
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts
    return {"total": total, "experts": experts, "active_per_token": active}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def sample_batch(streams: list[torch.Tensor], per_stream: int, seq_len: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Random windows, the same number from each domain, so every step (and therefore the
    batch-level load-balancing loss) sees both prose and code."""
    rows = []
    for stream in streams:
        starts = torch.randint(0, len(stream) - seq_len, (per_stream,), generator=gen)
        rows.extend(stream[s:s + seq_len] for s in starts.tolist())
    return torch.stack(rows)


def per_layer_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int,
                             top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed for each layer separately, then averaged.

    transformers' MixtralForCausalLM pools the router logits of *all* layers into one loss, so
    "expert 4" of layer 1 and "expert 4" of layer 3 count as the same expert.  Layers that
    favour different expert indices then cancel out: a first run with the built-in loss reported
    ~2.01 (the balanced optimum is 2.0) while layer 1 had an expert that was never picked.
    """
    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def training_loss(model: MixtralForCausalLM, ids: torch.Tensor,
                  aux_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, lm, aux) for one batch; compiled as a whole when --compile is on."""
    # No labels: the model's own loss would add the pooled aux loss described above.
    out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    targets = make_labels(ids)[:, 1:]
    logits = out.logits[:, :-1]
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           targets.reshape(-1), ignore_index=-100)
    aux = per_layer_balancing_loss(out.router_logits, model.config.num_local_experts,
                                   model.config.num_experts_per_tok)
    return lm + aux_coef * aux, lm, aux


def make_labels(ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels (the model shifts them); <s> targets are trivially predictable after
    </s>, so they are excluded from the loss."""
    labels = ids.clone()
    labels[labels == SPECIAL_TOKENS.index(BOS)] = -100
    return labels


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    tokens: int
    nll: float  # mean nats per predicted token
    bits_per_byte: float
    top1_counts: np.ndarray | None  # [layers, experts] top-1 routing counts
    topk_counts: np.ndarray | None  # [layers, experts] top-k (=2) routing counts ("load")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, stream: torch.Tensor, seq_len: int, token_bytes: torch.Tensor,
             max_tokens: int | None = None, batch: int = 8, routing: bool = False) -> EvalResult:
    """Perplexity over consecutive non-overlapping windows of a held-out token stream.

    Bits per byte are included because, unlike perplexity, they do not depend on the
    tokenizer; with routing=True also count each token's top-1 and top-k experts per layer.
    """
    model.eval()
    n_windows = len(stream) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), dtype=np.int64)
    counts_k = np.zeros_like(counts)
    nll_sum, n_tok, n_bytes = 0.0, 0, 0
    for i in range(0, n_windows, batch):
        ids = windows[i:i + batch]
        out = model(input_ids=ids, output_router_logits=routing, use_cache=False)
        logits = out.logits[:, :-1].float()
        targets = make_labels(ids)[:, 1:]
        mask = targets != -100
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                targets.reshape(-1), ignore_index=-100,
                                                reduction="sum")
        nll_sum += nll.item()
        n_tok += int(mask.sum())
        n_bytes += int(token_bytes[targets[mask]].sum())
        if routing:
            for layer, logits_l in enumerate(out.router_logits):
                top1 = logits_l.argmax(dim=-1)
                counts[layer] += np.bincount(top1.numpy(), minlength=cfg.num_local_experts)
                topk = logits_l.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
                counts_k[layer] += np.bincount(topk.numpy(), minlength=cfg.num_local_experts)
    model.train()
    return EvalResult(n_tok, nll_sum / n_tok, nll_sum / math.log(2) / n_bytes,
                      counts if routing else None, counts_k if routing else None)


def load_table(prose_k: np.ndarray, code_k: np.ndarray) -> str:
    """Markdown table of each expert's share of all top-k slots, prose and code pooled
    (1/num_experts each would be perfectly balanced)."""
    both = prose_k + code_k
    share = both / both.sum(axis=1, keepdims=True)
    experts = share.shape[1]
    rows = ["| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " | min |",
            "|" + "---|" * (experts + 2)]
    for layer, frac in enumerate(share):
        cells = " | ".join(f"{x:.2f}" for x in frac)
        rows.append(f"| {layer} | {cells} | {frac.min():.2f} |")
    return "\n".join(rows)


def routing_table(prose: np.ndarray, code: np.ndarray) -> tuple[str, list[float]]:
    """Markdown table of top-1 routing fractions; also per-layer total-variation distance
    between the prose and code distributions (0 = identical, 1 = disjoint experts)."""
    layers, experts = prose.shape
    pf = prose / prose.sum(axis=1, keepdims=True)
    cf = code / code.sum(axis=1, keepdims=True)
    tv = [float(0.5 * np.abs(pf[i] - cf[i]).sum()) for i in range(layers)]
    head = "| layer | domain | " + " | ".join(f"e{e}" for e in range(experts)) + " | TV(prose,code) |"
    sep = "|" + "---|" * (experts + 3)
    rows = [head, sep]
    for layer in range(layers):
        for name, frac in (("prose", pf[layer]), ("code", cf[layer])):
            cells = " | ".join(f"{x:.2f}" for x in frac)
            tv_cell = f"{tv[layer]:.2f}" if name == "prose" else ""
            rows.append(f"| {layer} | {name} | {cells} | {tv_cell} |")
    return "\n".join(rows), tv


@torch.no_grad()
def greedy_samples(model: MixtralForCausalLM, tok: PreTrainedTokenizerFast, n_new: int) -> dict[str, str]:
    model.eval()
    out: dict[str, str] = {}
    for prompts in PROMPTS.values():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids  # starts with <s>
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 do_sample=False)
            out[prompt] = tok.decode(gen[0], skip_special_tokens=True)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    seed_everything(args.seed, args.threads)
    t_start = time.time()
    report: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }

    # ---- corpora
    chapters = load_kjv_chapters()
    prose_train, prose_held = split_prose(chapters, args.prose_holdout_every)
    code_train, code_held = split_code(load_stdlib_files(), heldout_bytes=nbytes(prose_held),
                                       train_bytes=nbytes(prose_train))
    corpus = {
        "prose_train": {"docs": len(prose_train), "bytes": nbytes(prose_train)},
        "prose_heldout": {"docs": len(prose_held), "bytes": nbytes(prose_held)},
        "code_train": {"docs": len(code_train), "bytes": nbytes(code_train)},
        "code_heldout": {"docs": len(code_held), "bytes": nbytes(code_held)},
        "stdlib": sysconfig.get_paths()["stdlib"],
    }
    report["corpus"] = corpus
    print("corpus:", json.dumps(corpus), flush=True)

    # Held-out samples for the quality report / routing traces.  Code files of 1.5-8 KB so
    # the sample holds several different modules instead of one big one.
    args.heldout_dir.mkdir(parents=True, exist_ok=True)
    samples = {
        "prose": heldout_sample(prose_held, args.heldout_sample_bytes),
        "code": heldout_sample(code_held, args.heldout_sample_bytes, 1500, 8000),
    }
    for name, text in samples.items():
        (args.heldout_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    print({k: len(v.encode()) for k, v in samples.items()}, "bytes of held-out samples written", flush=True)

    # ---- tokenizer (training split only, so held-out text stays unseen)
    t0 = time.time()
    raw_tok = train_tokenizer(prose_train + code_train, args.vocab_size)
    check_roundtrip(raw_tok, [samples["prose"][:3000], samples["code"][:3000],
                              "\tdef f(x):\n\t\treturn x  # tab\n\n  trailing  \n", "naïve — ünïcode ✓\n"])
    tok = wrap_tokenizer(raw_tok, args.seq_len)
    vocab = raw_tok.get_vocab_size()
    # Byte length of every token, for tokenizer-independent bits-per-byte.
    token_bytes = torch.zeros(vocab, dtype=torch.long)
    for piece, idx in raw_tok.get_vocab().items():
        if piece not in SPECIAL_TOKENS:  # each ByteLevel vocab character stands for one byte
            token_bytes[idx] = len(piece)
    streams = {
        "prose_train": encode_stream(raw_tok, prose_train),
        "code_train": encode_stream(raw_tok, code_train),
        "prose_heldout": encode_stream(raw_tok, prose_held),
        "code_heldout": encode_stream(raw_tok, code_held),
    }
    report["tokenizer"] = {"vocab": vocab, "seconds": round(time.time() - t0, 1),
                           **{f"{k}_tokens": len(v) for k, v in streams.items()}}
    print("tokenizer:", json.dumps(report["tokenizer"]), flush=True)

    # ---- model
    model = build_model(args, vocab)
    params = count_params(model)
    report["params"] = params
    print("params:", json.dumps(params), flush=True)

    # No weight decay on norms / router (1-D and tiny); decay matrices and embeddings.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    # Compile only the training step; evaluation uses the eager module (same parameters),
    # which avoids recompiling for other shapes and for no-grad mode.
    loss_fn = torch.compile(training_loss) if args.compile else training_loss
    gen = torch.Generator().manual_seed(args.seed)
    per_stream = args.batch // 2
    train_streams = [streams["prose_train"], streams["code_train"]]

    # ---- training
    model.train()
    t_train = time.time()
    tokens_seen = 0
    history: list[dict] = []
    lm_ema = aux_ema = None
    for step in range(args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = sample_batch(train_streams, per_stream, args.seq_len, gen)
        loss, lm_t, aux_t = loss_fn(model, ids, args.aux_coef)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += ids.numel()

        lm, aux = lm_t.item(), aux_t.item()
        lm_ema = lm if lm_ema is None else 0.95 * lm_ema + 0.05 * lm
        aux_ema = aux if aux_ema is None else 0.95 * aux_ema + 0.05 * aux
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_train
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1:5d}/{args.steps} lm_loss {lm:.3f} (ema {lm_ema:.3f}) "
                  f"aux {aux_ema:.3f} lr {lr:.2e} {tokens_seen / el:6.0f} tok/s "
                  f"elapsed {el / 60:5.1f}m eta {eta / 60:5.1f}m", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ev = {d: evaluate(model, streams[f"{d}_heldout"], args.seq_len, token_bytes, max_tokens=8192)
                  for d in ("prose", "code")}
            history.append({"step": step + 1, "lm_ema": lm_ema,
                            **{f"{d}_ppl": round(r.ppl, 2) for d, r in ev.items()}})
            print(f"  eval@{step + 1}: prose ppl {ev['prose'].ppl:.2f}  code ppl {ev['code'].ppl:.2f} "
                  f"(first 8k held-out tokens)", flush=True)
    train_seconds = time.time() - t_train
    report["training"] = {"steps": args.steps, "tokens_seen": tokens_seen,
                          "seconds": round(train_seconds, 1),
                          "tokens_per_second": round(tokens_seen / train_seconds, 1),
                          "final_lm_loss_ema": lm_ema, "history": history}

    # ---- float32 evaluation + routing specialisation
    results: dict = {}
    fp32 = {d: evaluate(model, streams[f"{d}_heldout"], args.seq_len, token_bytes, routing=True)
            for d in ("prose", "code")}
    table, tv = routing_table(fp32["prose"].top1_counts, fp32["code"].top1_counts)
    results["fp32"] = {d: {"ppl": r.ppl, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}
                       for d, r in fp32.items()}
    sample_streams = {d: encode_stream(raw_tok, [Doc(d, samples[d])]) for d in samples}
    for d, s in sample_streams.items():
        r = evaluate(model, s, args.seq_len, token_bytes)
        results["fp32"][f"{d}_sample_file"] = {"ppl": r.ppl, "bits_per_byte": r.bits_per_byte,
                                               "tokens": r.tokens}
    loads = load_table(fp32["prose"].topk_counts, fp32["code"].topk_counts)
    report["routing"] = {"top1_prose": fp32["prose"].top1_counts.tolist(),
                         "top1_code": fp32["code"].top1_counts.tolist(),
                         "topk_prose": fp32["prose"].topk_counts.tolist(),
                         "topk_code": fp32["code"].topk_counts.tolist(),
                         "tv_per_layer": tv, "top1_table_md": table, "load_table_md": loads}
    print("fp32 held-out:", json.dumps(results["fp32"]), flush=True)
    print("top-1 routing fraction per layer (held-out):\n" + table, flush=True)
    print("expert load = share of top-k slots, prose+code held-out:\n" + loads, flush=True)

    # ---- save in bfloat16 (halves the size; the runtime quantises from this anyway)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     pad_token_id=model.config.pad_token_id).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    # transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot resolve;
    # "PreTrainedTokenizerFast" loads the same tokenizer.json in both major versions.
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.pop("backend", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    for path in args.out.iterdir():
        path.chmod(0o644)  # safetensors are written 0600 via a temp file; make them shippable
    files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    report["saved_files"] = files
    weights_mb = sum(v for k, v in files.items() if k.endswith(".safetensors")) / 1e6
    if weights_mb > 25:
        raise SystemExit(f"safetensors are {weights_mb:.1f} MB, above the 25 MB budget")
    print("saved:", json.dumps(files), flush=True)

    # ---- reload exactly what ships and re-check it in bf16
    del model
    shipped = MixtralForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16)
    shipped_tok = AutoTokenizer.from_pretrained(args.out)
    check_roundtrip(shipped_tok.backend_tokenizer, [samples["code"][:2000]])
    results["bf16"] = {}
    for d in ("prose", "code"):
        r = evaluate(shipped, streams[f"{d}_heldout"], args.seq_len, token_bytes)
        results["bf16"][d] = {"ppl": r.ppl, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}
        r = evaluate(shipped, sample_streams[d], args.seq_len, token_bytes)
        results["bf16"][f"{d}_sample_file"] = {"ppl": r.ppl, "bits_per_byte": r.bits_per_byte,
                                               "tokens": r.tokens}
    print("bf16 held-out:", json.dumps(results["bf16"]), flush=True)
    report["results"] = results
    report["samples_bf16"] = greedy_samples(shipped, shipped_tok, args.sample_tokens)
    for prompt, text in report["samples_bf16"].items():
        print(f"--- greedy (bf16) {prompt!r}:\n{text}\n", flush=True)

    report["wall_seconds"] = round(time.time() - t_start, 1)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=float))
    print(f"done in {report['wall_seconds'] / 60:.1f} min; report written to {args.report}", flush=True)


if __name__ == "__main__":
    main()
