"""A DNA-like text with little to learn past its token frequencies: bases (ACGT) drawn
from an order-3 Markov chain whose 64 next-base distributions are Dirichlet draws. The
best any model can do is the chain's conditional entropy, a few per cent below the
bases' unigram entropy, where the detectors' context-free line (10 % below it) assumes
more; `docs/detectors.md` ("The expected loss") reads the default suite on it.

    python benchmarks/markov_bases.py --out dna.txt [--bases 300000] [--concentration 6]
        [--seed 7]
    loopdiag run --loops 12 --data dna.txt --wandb off --out /tmp/dna

Prints the unigram entropy (the context-free loss, in nats) and the conditional entropy
(the lowest loss a model can reach) of the chain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BASES = "ACGT"
ORDER = 3


def markov_bases(n: int, concentration: float, seed: int) -> tuple[str, float, float]:
    """n bases, the unigram entropy of those drawn, and the chain's conditional entropy
    averaged over its contexts."""
    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet([concentration] * len(BASES), size=len(BASES) ** ORDER)
    cumulative = np.cumsum(transitions, axis=1)
    bases = list(rng.integers(0, len(BASES), ORDER))
    draws = rng.random(n)
    for i in range(n - ORDER):
        context = bases[-1] + 4 * bases[-2] + 16 * bases[-3]
        # searchsorted can land one past the end when a cumulative sum rounds under 1
        bases.append(min(int(np.searchsorted(cumulative[context], draws[i])), len(BASES) - 1))
    counts = np.bincount(bases, minlength=len(BASES)) / len(bases)
    unigram = float(-(counts * np.log(counts)).sum())
    conditional = float(-(transitions * np.log(transitions)).sum(axis=1).mean())
    return "".join(BASES[base] for base in bases), unigram, conditional


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bases", type=int, default=300_000)
    parser.add_argument("--concentration", type=float, default=6.0,
                        help="Dirichlet concentration: larger, nearer uniform, less to learn")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.bases <= ORDER or args.concentration <= 0:
        parser.error(f"--bases must be > {ORDER} and --concentration > 0")
    text, unigram, conditional = markov_bases(args.bases, args.concentration, args.seed)
    args.out.write_text(text, encoding="ascii")
    print(f"{args.out}: {len(text):,} bases; unigram entropy {unigram:.4f} nats, conditional "
          f"{conditional:.4f} ({100 * (1 - conditional / unigram):.1f} % below)")


if __name__ == "__main__":
    main()
