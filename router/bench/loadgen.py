"""Closed-loop load: each user sends its next request when the previous one finishes.

Output lengths follow a seeded lognormal distribution; user ``u`` of every cell draws
the same sequence, so every strategy and target serves exactly the same work.
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

__all__ = ["Outcome", "Workload", "run_users"]


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

    def lengths(self, user: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + user)

    def draw(self, rng: random.Random) -> int:
        tokens = round(rng.lognormvariate(math.log(self.median_tokens), self.sigma))
        return max(1, min(self.max_tokens, tokens))

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


def _inputs(prompt: int, tokens: int) -> list[aioclient.InferInput]:
    out = []
    for name, value in (("PROMPT_TOKENS", prompt), ("MAX_TOKENS", tokens)):
        t = aioclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        out.append(t)
    return out


async def _unary_user(address: str, user: int, workload: Workload, until: float,
                      out: list[Outcome]) -> None:
    rng = workload.lengths(user)
    async with aioclient.InferenceServerClient(address) as client:
        while time.monotonic() < until:
            tokens = workload.draw(rng)
            start = time.monotonic()
            error = None
            try:
                result = await client.infer("generate_unary",
                                            _inputs(workload.prompt_tokens, tokens),
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
            tokens = workload.draw(rng)
            start = time.monotonic()
            first: float | None = None
            error = None

            async def one(n: int = tokens) -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": "generate", "inputs": _inputs(workload.prompt_tokens, n)}

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
