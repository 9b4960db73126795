"""How well would speculative prefetch guess the next layer's experts? (the trained demo model)

    python benchmarks/prefetch_accuracy.py [--windows 8]

Speculative prefetch (Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models
with Offloading", 2023) applies layer l+1's router to a hidden state layer l already has, to
start paging layer l+1's experts before its attention has run. This measures the guess on the
shipped demo model (a trained Mixtral, 4 layers, 8 experts, top-2; transformers, float32) over
the held-out texts benchmarks/quality.py uses, for each layer l+1 >= 1 and token:

    late   layer l+1's router (its post-attention RMSNorm, then its gate) on layer l's output,
           i.e. layer l+1's input: available once layer l is done (lead: one attention)
    early  the same on layer l's post-attention residual, the input of layer l's experts:
           available before layer l's experts run (lead: layer l's experts and one attention)

Reported: recall, the share of the experts layer l+1 actually chose that the guess contains,
guessing top-k (as many as are used) and top-2k (twice as many to page in); `random` is what
guessing without the router gives (k / E and 2k / E).
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import window_arguments, windows  # noqa: E402


def recalls(model, ids: list[int]) -> dict[str, np.ndarray]:
    """{variant: [layers - 1, tokens, 2]} recall of the top-k and top-2k guesses."""
    import torch

    layers = model.model.layers
    k = model.config.num_experts_per_tok
    residual = {}  # layer -> its post-attention residual [T, H] (the norm's input)
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda module, args, output, i=i: residual.__setitem__(i, args[0]))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True, output_router_logits=True)
            result = {"late": [], "early": []}
            for nxt in range(1, len(layers)):
                actual = torch.topk(out.router_logits[nxt], k).indices  # [T, k]
                norm, gate = layers[nxt].post_attention_layernorm, layers[nxt].mlp.gate.weight
                sources = {"late": out.hidden_states[nxt], "early": residual[nxt - 1]}
                for variant, hidden in sources.items():
                    logits = norm(hidden.reshape(-1, gate.shape[1])) @ gate.T  # [T, E]
                    row = []
                    for guesses in (k, 2 * k):
                        guess = torch.topk(logits, guesses).indices  # [T, guesses]
                        hit = (actual[:, :, None] == guess[:, None, :]).any(-1)  # [T, k]
                        row.append(hit.float().mean(-1).numpy())
                    result[variant].append(np.stack(row, -1))  # [T, 2]
        return {v: np.stack(r) for v, r in result.items()}
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    args = window_arguments(__doc__.split("\n")[0])
    import torch
    from transformers import AutoModelForCausalLM

    with importlib.resources.as_file(importlib.resources.files("mobilemoe") / "demo_model"
                                     ) as checkpoint:
        data = windows(checkpoint, args.windows)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    c = model.config
    k, e = c.num_experts_per_tok, c.num_local_experts
    print(f"demo model: {c.num_hidden_layers} layers, {e} experts, top-{k}; "
          f"{args.windows} windows x 256 tokens per domain\n")
    print(f"| text | guess from | top-{k} recall | top-{2 * k} recall | per layer (top-{k}) |")
    print("|---|---|---|---|---|")
    for domain, ws in data.items():
        runs = [recalls(model, w) for w in ws]
        for variant in ("late", "early"):
            r = np.concatenate([run[variant] for run in runs], axis=1)  # [layers - 1, T, 2]
            per_layer = " / ".join(f"{x:.0%}" for x in r[:, :, 0].mean(axis=1))
            print(f"| {domain} | {variant} | {r[..., 0].mean():.1%} | {r[..., 1].mean():.1%} "
                  f"| {per_layer} |")
        print(f"| {domain} | random | {k / e:.1%} | {2 * k / e:.1%} | |")


if __name__ == "__main__":
    main()
