"""generate_unary: the work of `generate` (prefill, then decode per token) in one response.

With a SEED input the request stops at its own length (lognormal, drawn from the seed) and
MAX_TOKENS only caps it; without one it produces MAX_TOKENS tokens.
"""

import json
import math
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_TOKENS_LIMIT = 100_000


def own_length(seed, median, sigma, cap):
    """The length a request with ``seed`` stops at, at most ``cap``: the same function as
    `generate`'s and ``tritonmesh.bench.loadgen.own_length``."""
    rng = random.Random(seed)
    u1 = 1.0 - rng.random()
    u2 = rng.random()
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return min(cap, max(1, round(median * math.exp(sigma * z))))


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})

        def ms(key, default):
            return float(params.get(key, {}).get("string_value", default)) / 1000.0

        self.prefill_s = ms("prefill_ms_per_token", 0.05)
        self.decode_s = ms("decode_ms_per_token", 5)
        self.median = float(params.get("length_median_tokens", {}).get("string_value", 40))
        self.sigma = float(params.get("length_sigma", {}).get("string_value", 0.75))

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = int(pb_utils.get_input_tensor_by_name(request, "PROMPT_TOKENS").as_numpy()[0])
            max_tokens = int(pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS").as_numpy()[0])
            if prompt < 0 or not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
                message = (f"PROMPT_TOKENS must be >= 0 and MAX_TOKENS between 0 and "
                           f"{MAX_TOKENS_LIMIT}, got {prompt} and {max_tokens}")
                error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            seed = pb_utils.get_input_tensor_by_name(request, "SEED")
            length = max_tokens if seed is None else own_length(
                int(seed.as_numpy().reshape(-1)[0]), self.median, self.sigma, max_tokens)
            time.sleep(prompt * self.prefill_s + length * self.decode_s)
            tokens = pb_utils.Tensor("TOKENS", np.arange(length, dtype=np.int32))
            responses.append(pb_utils.InferenceResponse([tokens]))
        return responses
