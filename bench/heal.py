"""heal on the toy base: what each divergence learns, what it resists, and how far it drifts.

    python bench/heal.py [--seeds N] [--epochs E]

Kept data (`trainmedic.toy.style`): 100 prompts about stdlib names; 80 completions in a new
style (" Briefly: <first sentence> (<name>)"), 20 random token strings that slipped past a
filter. Each divergence trains one round from the same base with the same settings and seeds;
the round's adapter is then measured on 64 held-out names:

- KL(current || original) per token on the held-out prompts and on held-out pre-training text
  (docstrings): how far the round moved where it was not asked to;
- NLL per token of held-out clean completions in the style: what it learned;
- NLL per token of held-out incoherent completions (fresh random strings): how much of the noise
  it learned.

Then three stacked rounds (fresh kept data each round, earlier adapters as frozen history) with
`nll` and `kl_rev`, and the cost of the barrier: the median over paired steps of the kl_rev /
nll step time (the same batches in the same order). Results go between the `heal` markers of
bench/README.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- heal:start -->", "<!-- heal:end -->"
HEADING = "## heal: divergence barriers on the toy base"
MODES = ("nll", "kl_fwd", "kl_rev", "wd")
STACKED = ("nll", "kl_rev")
ROUNDS = 3
SETTINGS: dict[str, Any] = {
    "lr": 5e-3,  # the toy model's LoRA rate (trainmedic.toy.training.LORA_LR)
    "rank": 8,
    "batch_size": 8,
    "max_len": 128,
    "lam": 1.0,
    "tau": 0.1,
}
N_KEPT, N_HELDOUT, N_DOCS = 100, 64, 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WARMUP_PAIRS = 4
STACK_ROWS = (
    ("KL to original, prompts", "kl_prompts"),
    ("KL to original, docstrings", "kl_docs"),
    ("NLL clean", "clean"),
    ("NLL incoherent", "incoherent"),
)


@dataclass
class Measured:
    kl_prompts: float
    kl_docs: float
    clean: float
    incoherent: float
    heal_nll: float | None = None
    fired: float | None = None
    step_s: list[float] | None = field(default=None, repr=False)


def measure(base: Path, adapters: list[Path], sets: Any, docs: list[str]) -> Measured:
    from trainmedic.heal.measure import completion_nll, kl_to_original, load_stacked

    model, tok = load_stacked(base, adapters)
    return Measured(
        kl_prompts=kl_to_original(model, tok, sets.heldout_prompts),
        kl_docs=kl_to_original(model, tok, docs),
        clean=completion_nll(model, tok, sets.heldout_clean),
        incoherent=completion_nll(model, tok, sets.heldout_incoherent),
    )


def train(
    base: Path,
    data: list[dict[str, str]],
    out: Path,
    mode: str,
    seed: int,
    epochs: float,
    history: list[Path],
) -> Any:
    from trainmedic.heal import heal_round

    return heal_round(
        base,
        data,
        out,
        divergence=mode,
        seed=seed,
        epochs=epochs,
        history=history,
        echo=lambda line: None,
        **SETTINGS,
    )


def original(base: Path, sets: Any) -> Measured:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainmedic.heal.measure import completion_nll

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    return Measured(
        0.0,
        0.0,
        completion_nll(model, tok, sets.heldout_clean),
        completion_nll(model, tok, sets.heldout_incoherent),
    )


def step_cost(
    base: Path, kept: list[dict[str, str]], pairs: int
) -> tuple[list[float], list[float], list[float]]:
    """Forward + backward of one heal step (the round's own `compute_loss`), `nll` and `kl_rev`
    alternating on the same batches in one process, so machine load hits both alike."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from trainmedic.heal.adapters import attach
    from trainmedic.heal.data import from_records
    from trainmedic.heal.tokens import Collator, encode
    from trainmedic.heal.trainer import HealTrainer

    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    lora = LoraConfig(
        r=SETTINGS["rank"],
        lora_alpha=2 * SETTINGS["rank"],
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    peft_model, frozen = attach(model, lora, [])
    rows = encode(from_records(kept), tok, SETTINGS["max_len"]).rows
    collate, size = Collator(tok.pad_token_id), SETTINGS["batch_size"]
    batches = [collate(rows[i : i + size]) for i in range(0, len(rows), size)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to="none")
        trainer = HealTrainer(model=peft_model, args=args, divergence="nll", lam=1.0, tau=0.1, frozen=frozen)
    ratios, nll, kl = [], [], []
    for i in range(pairs + WARMUP_PAIRS):
        batch = batches[i % len(batches)]
        took = {}
        for mode in ("nll", "kl_rev") if i % 2 == 0 else ("kl_rev", "nll"):
            trainer.divergence = mode
            t0 = time.perf_counter()
            trainer.compute_loss(peft_model, batch).backward()
            took[mode] = time.perf_counter() - t0
            peft_model.zero_grad(set_to_none=True)
        if i >= WARMUP_PAIRS:
            ratios.append(took["kl_rev"] / took["nll"])
            nll.append(took["nll"])
            kl.append(took["kl_rev"])
    return ratios, nll, kl


def spread(values: list[float], fmt: str = ".3f") -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per divergence (mean and range shown)")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--pairs", type=int, default=200, help="paired steps for the cost of the barrier")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainmedic.toy.base import toy_base
    from trainmedic.toy.corpus import corpus_texts
    from trainmedic.toy.style import style_sets

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    base = toy_base()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    sets = style_sets(tok, n_kept=N_KEPT, n_heldout=N_HELDOUT, rounds=ROUNDS)
    docs = [" ".join(t.split()[:80]) for t in corpus_texts("heldout")[:N_DOCS]]
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        results, stacked = run_rounds(Path(tmp), base, sets, docs, args)
    cost = step_cost(base, sets.kept, args.pairs)
    base_m = original(base, sets)
    write(results, stacked, base_m, cost, args, time.perf_counter() - started)
    return 0


def run_rounds(
    work: Path, base: Path, sets: Any, docs: list[str], args: Any
) -> tuple[dict[str, list[Measured]], dict[str, list[Measured]]]:
    """Every divergence for every seed, then the stacked rounds (seed 0's round 1 is their first)."""
    results: dict[str, list[Measured]] = {m: [] for m in MODES}
    round_one: dict[str, Path] = {}
    for seed in range(args.seeds):
        for mode in MODES:
            out = work / f"{mode}-s{seed}"
            res = train(base, sets.rounds[0], out, mode, seed, args.epochs, [])
            m = measure(base, [out], sets, docs)
            m.heal_nll = res.heal_nll
            m.fired = sum(r.fired for r in res.rows) / len(res.rows)
            m.step_s = [r.seconds for r in res.rows]
            results[mode].append(m)
            if seed == 0:
                round_one[mode] = out
            print(f"seed {seed} {mode}: {m}", flush=True)
    stacked: dict[str, list[Measured]] = {}
    for mode in STACKED:
        rounds = [round_one[mode]]
        stacked[mode] = [results[mode][0]]
        for k in range(1, ROUNDS):
            out = work / f"{mode}-round{k + 1}"
            train(base, sets.rounds[k], out, mode, 0, args.epochs, list(rounds))
            rounds.append(out)
            stacked[mode].append(measure(base, rounds, sets, docs))
            print(f"{mode} round {k + 1}: {stacked[mode][-1]}", flush=True)
    return results, stacked


def in_round_ratio(results: dict[str, list[Measured]]) -> float:
    """Median ratio of whole optimizer steps (optimizer, watcher, data included) inside the rounds,
    step i of kl_rev against step i of nll (the same batch), over all seeds."""
    ratios = []
    for a, b in zip(results["nll"], results["kl_rev"], strict=True):
        ratios += [y / x for x, y in zip(a.step_s or [], b.step_s or [], strict=True) if x and y]
    return statistics.median(ratios)


def reading(
    results: dict[str, list[Measured]], stacked: dict[str, list[Measured]], base: Measured
) -> list[str]:
    """Each expectation of the issue, its criterion, the numbers, and whether it held."""

    def mean(mode: str, key: str) -> float:
        return statistics.fmean(getattr(m, key) for m in results[mode])

    def held(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    gain = {m: base.clean - mean(m, "clean") for m in ("nll", "kl_rev")}
    noise = {m: base.incoherent - mean(m, "incoherent") for m in ("nll", "kl_rev")}
    kl = {m: mean(m, "kl_prompts") for m in ("nll", "kl_rev")}
    drift = {m: (stacked[m][0].kl_prompts, stacked[m][-1].kl_prompts) for m in STACKED}
    docs = {m: (stacked[m][0].kl_docs, stacked[m][-1].kl_docs) for m in STACKED}
    share = gain["kl_rev"] / gain["nll"]
    closer = kl["kl_rev"] / kl["nll"]
    learned = noise["kl_rev"] / noise["nll"]
    grow = drift["kl_rev"][1] / drift["kl_rev"][0]
    return [
        f"- learns the style nearly as well (>= 90 % of nll's drop in clean NLL): {gain['kl_rev']:.3f} vs "
        f"{gain['nll']:.3f} nats = {share:.0%}: {held(share >= 0.9)}",
        f"- stays much closer to the original (at most half nll's KL on held-out prompts): "
        f"{kl['kl_rev']:.4f} vs {kl['nll']:.4f} = {closer:.0%}: {held(closer <= 0.5)}",
        f"- learns the incoherent samples less (a smaller drop in their NLL): {noise['kl_rev']:.3f} vs "
        f"{noise['nll']:.3f} nats = {learned:.0%}: {held(learned < 1)}",
        f"- bounded drift over rounds (KL on prompts after round {ROUNDS} within 1.25x round 1): kl_rev "
        f"{drift['kl_rev'][0]:.4f} -> {drift['kl_rev'][1]:.4f} (x{grow:.2f}), nll {drift['nll'][0]:.4f} -> "
        f"{drift['nll'][1]:.4f} (x{drift['nll'][1] / drift['nll'][0]:.2f}): {held(grow <= 1.25)}; "
        f"on held-out docstrings kl_rev {docs['kl_rev'][0]:.4f} -> {docs['kl_rev'][1]:.4f} "
        f"(x{docs['kl_rev'][1] / docs['kl_rev'][0]:.2f}), nll {docs['nll'][0]:.4f} -> {docs['nll'][1]:.4f} "
        f"(x{docs['nll'][1] / docs['nll'][0]:.2f})",
    ]


def write(
    results: dict[str, list[Measured]],
    stacked: dict[str, list[Measured]],
    base_m: Measured,
    cost: tuple[list[float], list[float], list[float]],
    args: Any,
    seconds: float,
) -> None:
    steps = len(results["nll"][0].step_s or [])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/heal.py` ({seconds:.0f} s, one torch thread): "
        f"{N_KEPT} kept examples ({N_KEPT // 5} incoherent), {args.epochs:g} epochs = {steps} steps of "
        f"batch {SETTINGS['batch_size']}, LoRA r={SETTINGS['rank']} on q/k/v/o, lr {SETTINGS['lr']:g}, "
        f"lam {SETTINGS['lam']:g}, tau {SETTINGS['tau']:g} nats/token; {args.seeds} seed(s) each, "
        f"mean (range). Held out: {N_HELDOUT} names, {N_DOCS} docstrings.",
        "",
        "| divergence | KL to original, held-out prompts | KL to original, held-out docstrings | "
        "NLL clean (style) | NLL incoherent | heal_nll | barrier fired |",
        "|---|---|---|---|---|---|---|",
        f"| original (no round) | 0 | 0 | {base_m.clean:.3f} | {base_m.incoherent:.3f} | | |",
    ]
    for mode, ms in results.items():
        fired = "" if mode in ("nll", "wd") else spread([m.fired or 0.0 for m in ms], ".0%")
        cells = [
            spread([m.kl_prompts for m in ms], ".4f"),
            spread([m.kl_docs for m in ms], ".4f"),
            spread([m.clean for m in ms]),
            spread([m.incoherent for m in ms]),
            spread([m.heal_nll or 0.0 for m in ms]),
            fired,
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Three stacked rounds (seed 0; round k trains on {N_KEPT} fresh kept examples with rounds 1..k-1 as "
        "frozen history; measured with all k adapters applied):",
        "",
        "| divergence | measure | " + " | ".join(f"round {k + 1}" for k in range(ROUNDS)) + " |",
        "|---|---|" + "---|" * ROUNDS,
    ]
    for mode, ms in stacked.items():
        for label, key in STACK_ROWS:
            lines.append(f"| {mode} | {label} | " + " | ".join(f"{getattr(m, key):.4f}" for m in ms) + " |")
    lines += [
        "",
        "Against the expectations (kl_rev against nll, means over seeds; the criteria are fixed here):",
        "",
    ]
    lines += reading(results, stacked, base_m)
    ratios, nll_s, kl_s = cost
    q = statistics.quantiles(ratios, n=4)
    lines += [
        "",
        f"Cost of the barrier: forward + backward of a kl_rev step / an nll step on the same batch, "
        f"alternating, median of {len(ratios)} pairs: **{statistics.median(ratios):.2f}x** "
        f"(quartiles {q[0]:.2f}-{q[2]:.2f}; medians {statistics.median(kl_s) * 1e3:.1f} ms vs "
        f"{statistics.median(nll_s) * 1e3:.1f} ms). Whole optimizer steps inside the rounds above "
        f"(optimizer, watcher and data included; runs at different times): "
        f"{in_round_ratio(results):.2f}x.",
    ]
    block = START + "\n" + "\n".join(lines) + "\n" + END
    text = README.read_text(encoding="utf-8")
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    README.write_text(text, encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
