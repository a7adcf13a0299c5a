"""Text generation from a bundle: route once per context, prefill the prompt once, decode with the KV cache.

:class:`Generator` is the reference loop a device app runs:

1. :meth:`Generator.set_context` routes a context to its memory path and fills the slot (only the levels
   whose node changed are fetched).  With ``reroute="on-change"`` (the default) every new context string is
   routed; with ``reroute="never"`` the first context's path is kept for the generator's life (a session
   whose context keeps growing, e.g. a chat, keeps the memory it started with and never pays a fetch).
   Routing a context equal to the current one does nothing.
2. :meth:`Generator.generate` prefills the prompt from position 0 in one call of the decode program, then
   feeds one token per call at the next position; the slot is the same buffers for every call, so the
   memory is constant for the whole sequence.  Sampling is greedy (``temperature=0``) or temperature with
   optional top-k / top-p from a seeded generator (same seed, same tokens); it stops at a stop token, after
   ``max_new_tokens``, or when the cache (``max_seq_len`` positions) is full.  ``on_text`` receives the
   decoded text as it grows (whole characters only: a multi-byte character split across tokens is held
   back until it is complete).

Bundles whose target has no decode program fall back to :class:`WindowDecoder`, which re-runs the
full-window program on the whole sequence per token (same tokens, much slower).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hm_export.errors import BundleError, UsageError
from hm_export.runtime_stubs.block_cache import SlotUpdate
from hm_export.runtime_stubs.decoders import LastOfWholeCall

if TYPE_CHECKING:
    from hm_export.runtime_stubs.loader import BundleLoader
    from hm_export.targets import Decoder

REROUTE = ("on-change", "never")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.  ``temperature=0``: greedy (argmax; ``top_k``/``top_p``/``seed`` unused).
    Otherwise softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0: all) and to the
    smallest set whose probability reaches ``top_p`` (1: all), sampled with a generator seeded by ``seed``."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UsageError(
                f"bad sampling settings {self}: need max_new_tokens >= 0, temperature >= 0, top_k >= 0, 0 < top_p <= 1"
            )

    def torch_generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token for the logits ``[vocab]`` of the last position."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    # A NaN or +inf (a damaged program or block) must not poison the distribution: NaN never, +inf the largest.
    big = torch.finfo(torch.float32).max
    scores = torch.nan_to_num(logits.float() / sampling.temperature, nan=float("-inf"), posinf=big)
    if torch.isneginf(scores).all():
        raise BundleError("the program returned no finite logit to sample from (a damaged program or memory block)")
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        outside = cumulative - torch.softmax(ordered, dim=-1) >= sampling.top_p  # mass before it already enough
        scores = scores.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


class TextStream:
    """Incremental detokenization: :meth:`push` returns the text a new token completes (possibly empty)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.tokens, self.text = decode, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


@dataclass
class Generation:
    """One generated continuation and its timings (seconds; ``first_token`` = prefill + first sampling)."""

    path: tuple[int, ...]
    prompt_tokens: int
    new_tokens: list[int]
    text: str
    stop_reason: str  # "stop_token", "max_new_tokens" or "cache_full"
    prefill_seconds: float
    first_token_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens fed through the decode program per second (the first new token comes from the prefill)."""
        return len(self.step_seconds) / self.decode_seconds if self.decode_seconds else 0.0


class WindowDecoder(LastOfWholeCall):
    """The :class:`~hm_export.targets.Decoder` interface over a full-window program: every call re-runs the
    window on the whole sequence so far (no KV cache; for bundles without a decode program)."""

    def __init__(self, loader: BundleLoader) -> None:
        self.loader, self.history = loader, []

    def reset(self) -> None:
        self.history = []

    def __call__(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        self.history = self.history[:input_pos] + tokens[0].tolist()
        window = self.loader.contract.seq_len
        if len(self.history) > window:
            raise UsageError(f"sequence of {len(self.history)} tokens exceeds the program's {window}")
        return self.loader.logits(self.history)[input_pos:]


class Generator:
    """Generate text from a bundle with one target's decode program (see the module docstring)."""

    def __init__(self, loader: BundleLoader, target: str = "executorch", reroute: str = "on-change") -> None:
        if reroute not in REROUTE:
            raise UsageError(f"reroute must be one of {REROUTE}, not {reroute!r}")
        self.loader, self.reroute = loader, reroute
        self.context: str | None = None
        if loader.has_decoder(target):
            self.decoder: Decoder = loader.open_decoder(target)
            self.capacity = loader.config.max_seq_len
        else:
            loader.use_target(target)
            self.decoder = WindowDecoder(loader)
            self.capacity = loader.contract.seq_len

    def set_context(self, context: str) -> SlotUpdate | None:
        """Route ``context`` and fill the slot with its path (see ``reroute``); None when nothing was routed."""
        if context == self.context or (self.reroute == "never" and self.context is not None):
            return None
        update = self.loader.route_and_set(context)
        self.context = context
        return update

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """Start a new sequence: logits ``[n, vocab]`` of ``tokens`` fed from position 0 in one call."""
        return self.decoder(self._new_sequence(tokens), 0, self.loader.slot)

    def prefill_last(self, tokens: Sequence[int]) -> torch.Tensor:
        """:meth:`prefill`, returning the last position's logits ``[vocab]`` only: what generation needs, and
        all a program with a prefill method computes the output head for."""
        return self.decoder.last(self._new_sequence(tokens), 0, self.loader.slot)

    def _new_sequence(self, tokens: Sequence[int]) -> torch.Tensor:
        """``tokens [1, n]`` for a prefill from position 0, after checking the path and the prompt's length."""
        if any(node is None for node in self.loader.path):
            raise UsageError("no memory path set: call set_context() (or the loader's set_path()) first")
        tokens = list(tokens)
        if not 1 <= len(tokens) <= self.capacity:
            raise UsageError(f"prompt of {len(tokens)} tokens: need 1 to {self.capacity}")
        self.decoder.reset()
        return torch.tensor([tokens])

    def generate(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling = Sampling(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue ``prompt`` (text or token ids) with the memory of the current path."""
        tokens = self.loader.encode(prompt) if isinstance(prompt, str) else list(prompt)
        generator = sampling.torch_generator()
        stream = TextStream(self.loader.tokenizer.decode)
        start = time.perf_counter()
        logits = self.prefill_last(tokens)
        prefill_seconds = time.perf_counter() - start
        new: list[int] = []
        steps: list[float] = []
        first_token = 0.0
        reason = "max_new_tokens"
        while len(new) < sampling.max_new_tokens:
            token = next_token(logits, sampling, generator)
            if not new:
                first_token = time.perf_counter() - start
            if token in sampling.stop_tokens:
                reason = "stop_token"
                break
            new.append(token)
            if on_text is not None and (piece := stream.push(token)):
                on_text(piece)
            if len(new) == sampling.max_new_tokens:
                break
            position = len(tokens) + len(new) - 1  # where the token just sampled goes in the cache
            if position >= self.capacity:
                reason = "cache_full"
                break
            step = time.perf_counter()
            logits = self.decoder(torch.tensor([[token]]), position, self.loader.slot)[-1]
            steps.append(time.perf_counter() - step)
        return Generation(
            path=tuple(int(n) for n in self.loader.path),  # type: ignore[arg-type]
            prompt_tokens=len(tokens),
            new_tokens=new,
            text=self.loader.tokenizer.decode(new),
            stop_reason=reason,
            prefill_seconds=prefill_seconds,
            first_token_seconds=first_token,
            decode_seconds=sum(steps),
            step_seconds=steps,
        )
