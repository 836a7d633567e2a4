"""generate: a decoupled model that streams tokens the way an LLM on one GPU would."""

import json
import math
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_TOKENS_LIMIT = 100_000
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def timing(args):
    params = json.loads(args["model_config"]).get("parameters", {})

    def ms(key, default):
        return float(params.get(key, {}).get("string_value", default)) / 1000.0

    return ms("prefill_ms_per_token", 0.05), ms("decode_ms_per_token", 5)


def lengths(args):
    """The lognormal of the requests' own lengths: (median tokens, sigma)."""
    params = json.loads(args["model_config"]).get("parameters", {})

    def value(key, default):
        return float(params.get(key, {}).get("string_value", default))

    return value("length_median_tokens", 40), value("length_sigma", 0.75)


def own_length(seed, median, sigma, cap):
    """The length a request with ``seed`` stops at, at most ``cap``; the same function
    as ``tritonmesh.bench.loadgen.own_length`` (Box-Muller on Python's seeded Mersenne
    Twister: the same numbers on every platform)."""
    rng = random.Random(seed)
    u1 = 1.0 - rng.random()
    u2 = rng.random()
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return min(cap, max(1, round(median * math.exp(sigma * z))))


def scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return int(tensor.as_numpy().reshape(-1)[0])


def validate(prompt, max_tokens):
    if prompt < 0:
        return f"PROMPT_TOKENS must be >= 0, got {prompt}"
    if not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
        return f"MAX_TOKENS must be between 0 and {MAX_TOKENS_LIMIT}, got {max_tokens}"
    return None


class TritonPythonModel:
    def initialize(self, args):
        self.prefill_s, self.decode_s = timing(args)
        self.median, self.sigma = lengths(args)

    def execute(self, requests):
        # One instance, one request at a time: the next waits, as on a busy GPU.
        for request in requests:
            sender = request.get_response_sender()
            prompt = scalar(request, "PROMPT_TOKENS")
            max_tokens = scalar(request, "MAX_TOKENS")
            fail_after = scalar(request, "FAIL_AFTER", -1)
            seed = scalar(request, "SEED")
            problem = validate(prompt, max_tokens)
            if problem:
                error = pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                continue
            length = max_tokens if seed is None else own_length(
                seed, self.median, self.sigma, max_tokens)
            time.sleep(prompt * self.prefill_s)
            for i in range(length):
                if i == fail_after:
                    error = pb_utils.TritonError(f"generation failed after {i} tokens")
                    sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                    break
                if request.is_cancelled():
                    sender.send(flags=FINAL)
                    break
                time.sleep(self.decode_s)
                token = pb_utils.Tensor("TOKEN", np.array([i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse([token]))
            else:
                sender.send(flags=FINAL)
        return None
