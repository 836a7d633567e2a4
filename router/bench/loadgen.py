"""Closed-loop load: each user sends its next request when the previous one finishes.

Each request carries a seed, and the demo model stops at the length it draws from it
(lognormal, the workload's median and sigma), as an LLM stops at its end-of-sequence
token; ``MAX_TOKENS`` only caps it. User ``u`` of every cell draws the same seeds, so every
strategy and target serves exactly the same work. What a real client knows of that length
goes in the request parameter ``length_hint`` (read by the router's ``work_hints``, ignored
by the peers), as ``--hint`` says: ``exact`` (the oracle: the length itself), ``noisy:SIGMA``
(the length times lognormal(0, SIGMA), as from a length predictor), ``cap:N`` (the client
asks for at most N tokens and states that), or ``none``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

__all__ = ["HINT_PARAMETER", "Outcome", "Request", "Workload", "hint_label", "own_length",
           "parse_hint", "run_users"]

HINT_PARAMETER = "length_hint"


def own_length(seed: int, median: float, sigma: float, cap: int) -> int:
    """The length the demo models stop at for a request with ``seed``, at most ``cap``: the
    same function as in ``workers/models/generate*/1/model.py`` (Box-Muller on Python's
    seeded Mersenne Twister: the same numbers on every platform)."""
    rng = random.Random(seed)
    u1 = 1.0 - rng.random()
    u2 = rng.random()
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return min(cap, max(1, round(median * math.exp(sigma * z))))


def parse_hint(text: str) -> str:
    """``exact``, ``noisy:SIGMA`` (SIGMA > 0), ``cap:N`` (N >= 1) or ``none``; ValueError
    naming what is wrong otherwise."""
    kind, _, value = text.partition(":")
    if kind in ("exact", "none") and not value:
        return text
    try:
        if kind == "noisy" and 0 < float(value) < math.inf:
            return text
        if kind == "cap" and int(value) >= 1:
            return text
    except ValueError:
        pass
    raise ValueError(f"hint must be exact, noisy:SIGMA (SIGMA > 0), cap:N (N >= 1) or none, "
                     f"got {text!r}")


def hint_label(hint: str) -> str:
    """How a hint is named in every table: the exact one is the oracle no client has."""
    return "exact (oracle)" if hint == "exact" else hint


@dataclass(frozen=True)
class Request:
    """One request as sent: its seed, the cap (``MAX_TOKENS``), the hint (None: none)
    and the length the model will stop at."""

    seed: int
    cap: int
    hint: int | None
    tokens: int


@dataclass(frozen=True)
class Workload:
    """What each request asks for, and what it costs a worker with nothing queued."""

    median_tokens: float = 40.0
    sigma: float = 0.75  # lognormal spread: P99 / median = exp(2.33 sigma)
    max_tokens: int = 2000
    prompt_tokens: int = 32
    decode_ms: float = 2.0
    prefill_ms: float = 0.05
    seed: int = 7
    hint: str = "exact"  # see parse_hint

    def lengths(self, user: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + user)

    def draw(self, rng: random.Random) -> Request:
        """The next request of the user whose generator is ``rng``; the same for every
        hint (the hint's noise comes from the request's own seed)."""
        seed = rng.getrandbits(62)
        kind, _, value = self.hint.partition(":")
        cap = int(value) if kind == "cap" else self.max_tokens
        tokens = own_length(seed, self.median_tokens, self.sigma, cap)
        hint: int | None = None
        if kind == "exact":
            hint = tokens
        elif kind == "noisy":
            noise = random.Random(seed ^ 1 << 62).lognormvariate(0.0, float(value))
            hint = max(1, round(tokens * noise))
        elif kind == "cap":
            hint = cap
        return Request(seed, cap, hint, tokens)

    def service_s(self, tokens: int) -> float:
        return (self.prompt_tokens * self.prefill_ms + tokens * self.decode_ms) / 1000.0


@dataclass(frozen=True)
class Outcome:
    user: int
    tokens: int
    start: float
    end: float
    ttft: float | None  # time to first token (streaming)
    error: str | None


def _inputs(prompt: int, request: Request) -> list[aioclient.InferInput]:
    out = []
    for name, value in (("PROMPT_TOKENS", prompt), ("MAX_TOKENS", request.cap)):
        t = aioclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        out.append(t)
    seed = aioclient.InferInput("SEED", [1], "INT64")
    seed.set_data_from_numpy(np.array([request.seed], dtype=np.int64))
    out.append(seed)
    return out


def _parameters(request: Request) -> dict[str, int] | None:
    return None if request.hint is None else {HINT_PARAMETER: request.hint}


async def _unary_user(address: str, user: int, workload: Workload, until: float,
                      out: list[Outcome]) -> None:
    rng = workload.lengths(user)
    async with aioclient.InferenceServerClient(address) as client:
        while time.monotonic() < until:
            request = workload.draw(rng)
            tokens = request.tokens
            start = time.monotonic()
            error = None
            try:
                result = await client.infer("generate_unary",
                                            _inputs(workload.prompt_tokens, request),
                                            parameters=_parameters(request),
                                            client_timeout=600)
                answer = result.as_numpy("TOKENS")
                received = 0 if answer is None else answer.size
                if received != tokens:
                    error = f"expected {tokens} tokens, received {received}"
            except InferenceServerException as exc:
                error = f"{exc.status()} {exc.message()}"
            out.append(Outcome(user, tokens, start, time.monotonic(), None, error))


async def _stream_user(address: str, user: int, workload: Workload, until: float,
                       out: list[Outcome]) -> None:
    rng = workload.lengths(user)
    async with aioclient.InferenceServerClient(address) as client:
        while time.monotonic() < until:
            request = workload.draw(rng)
            tokens = request.tokens
            start = time.monotonic()
            first: float | None = None
            error = None

            async def one(r: Request = request) -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": "generate", "inputs": _inputs(workload.prompt_tokens, r),
                       "parameters": _parameters(r)}

            received = 0
            try:
                # One stream per request, half-closed after it: the stream ends when the
                # request has had its last response.
                async for _, err in client.stream_infer(one(), stream_timeout=600):
                    if err is not None:
                        error = str(err)
                        continue
                    received += 1
                    if first is None:
                        first = time.monotonic()
            except InferenceServerException as exc:
                error = f"{exc.status()} {exc.message()}"
            if error is None and received != tokens:
                error = f"expected {tokens} tokens, received {received}"
            end = time.monotonic()
            out.append(Outcome(user, tokens, start, end,
                               None if first is None else first - start, error))


async def run_users(address: str, users: int, workload: Workload, seconds: float,
                    streaming: bool, first_user: int = 0) -> list[Outcome]:
    """Run ``users`` closed-loop users for ``seconds``; in-flight requests then finish.

    Users are numbered from ``first_user`` (each number draws its own lengths), so that
    users split over several addresses still draw what one address's users would.
    """
    until = time.monotonic() + seconds
    out: list[Outcome] = []
    user = _stream_user if streaming else _unary_user
    await asyncio.gather(*(user(address, u, workload, until, out)
                           for u in range(first_user, first_user + users)))
    return out
