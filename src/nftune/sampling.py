"""How answers are sampled, as one value: what every generation engine takes whole, for
training rollouts, in-training evaluation, ``nftune eval``, the demo and compare alike.
Imports nothing heavy (the config builds it)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# nftune eval's answer budget unless given (the nft-paper protocol's context)
EVAL_MAX_NEW_TOKENS = 4096


def is_greedy(temperature: float) -> bool:
    """Temperature 0 means greedy decoding: the most likely token at every step."""
    return temperature <= 0


@dataclass(frozen=True)
class Sampling:
    """Sampling of ``n`` answers per prompt.

    ``temperature`` 0 is greedy decoding (then top-p and top-k do not apply, and it gives one
    answer per prompt: ``n`` above 1 is an error). ``top_k`` 0 turns the top-k filter off
    (Hugging Face ``generate`` would otherwise apply 50). ``seed`` seeds engines that seed per
    call (vLLM); the Hugging Face engine follows torch's generator.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.temperature >= 0, f"temperature: must be 0 (greedy) or more, got "
                                          f"{self.temperature}"),
                  (0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k: must be 0 (off) or more, got {self.top_k}"),
                  (self.max_new_tokens >= 1, "max_new_tokens: must be at least 1"),
                  (self.n >= 1, f"n: at least one answer per prompt, got {self.n}"),
                  (not (self.greedy and self.n > 1),
                   f"n: greedy decoding (temperature 0) gives one answer per prompt; {self.n} "
                   "samples need a temperature above 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def with_n(self, n: int) -> Sampling:
        return replace(self, n=n)
