"""Sample degeneracy, the reward-hacking symptom of an RL-trained language model: a policy that found a
cheap reward (or collapsed) repeats itself, and its text shows it before the averages do.

    distinct_n(seqs, n)   unique n-grams / all n-grams, pooled over the sequences (1.0: nothing repeats)
    longest_run(seqs)     the longest stretch of one token (or char) repeated back to back
    sample_health(seqs)   both, as the metrics a run logs with its text samples

Pure functions of token sequences (a str is a sequence of chars, a list of ids works alike), so that
they are tested on constructed strings and apply to any tokenizer.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

DISTINCT_ORDERS = (1, 2, 3)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """|unique n-grams| / |n-grams| over all sequences, n-grams never spanning two sequences.

    1.0 when no n-gram occurs twice (also when there is no n-gram at all: nothing repeats); near 0
    for text that loops. Li et al. (2016), "A Diversity-Promoting Objective Function for Neural
    Conversation Models", use it to measure the same failure in dialogue models.
    """
    if n < 1:
        raise ValueError(f"n={n}: an n-gram has at least one token")
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_run(sequences: Sequence[Sequence[Hashable]]) -> int:
    """The length of the longest run of one token repeated back to back in any sequence (0 if all empty)."""
    longest = 0
    for seq in sequences:
        run = 0
        for i, token in enumerate(seq):
            run = run + 1 if i and token == seq[i - 1] else 1
            longest = max(longest, run)
    return longest


def sample_health(sequences: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """sample_distinct_1/2/3 and sample_longest_run of generated sequences (the caller leaves the
    prompts out)."""
    metrics = {f"sample_distinct_{n}": distinct_n(sequences, n) for n in DISTINCT_ORDERS}
    metrics["sample_longest_run"] = float(longest_run(sequences))
    return metrics


def degeneracy_warning(metrics: dict[str, float], threshold: float) -> str | None:
    """The warning to log when distinct-2 of the samples fell below `threshold` (DEGENERACY_WARN;
    0 = never)."""
    distinct = metrics.get("sample_distinct_2")
    if distinct is None or distinct >= threshold:
        return None
    return (f"Text samples repeat themselves: distinct-2 {distinct:.3f} is below DEGENERACY_WARN={threshold} "
            f"(longest run of one token: {metrics.get('sample_longest_run', 0):.0f}); the policy may be "
            "collapsing or exploiting its reward.")
