"""Who may call what: bearer tokens on the router's two listeners, and the control RPCs.

* Data listener (``listen``): with ``auth.data_tokens_file``, every call but
  ``grpc.health.v1`` needs ``authorization: Bearer <token>``, a data or an admin token;
  otherwise UNAUTHENTICATED. Without it nothing is checked and nothing is installed.
* Admin listener (``admin_listen``): with ``auth.admin_tokens_file``, every call needs
  an admin token.
* Control RPCs on the data listener (:data:`CONTROL_RPCS`: they change every instance
  behind the router) are refused with PERMISSION_DENIED unless the call carries an admin
  token, whatever the data plane's setting: Triton's ``--grpc-restricted-protocol``,
  with the admin token as the key.

Tokens are compared with :func:`hmac.compare_digest` against every configured token,
so the time taken does not tell which one came close. A token the router checked is
its own credential: it is not forwarded to Triton (:data:`CREDENTIAL_KEY`).
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final

import grpc
import grpc.aio

__all__ = ["CONTROL_RPCS", "CREDENTIAL_KEY", "ControlAccess", "TokenInterceptor", "Tokens",
           "WithoutCredential"]

CREDENTIAL_KEY: Final = "authorization"
_SCHEME: Final = "bearer "
HEALTH_PREFIX: Final = "/grpc.health.v1.Health/"

# What Triton's --grpc-restricted-protocol calls "model-repository", "trace", "logging"
# and "shared-memory": the calls the router broadcasts, or that reach the instances' memory.
CONTROL_RPCS: Final = frozenset({
    "RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting", "LogSettings",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
})


class Tokens:
    """The tokens one plane accepts; replaced in place when the config is reloaded."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Iterable[str] | None = None):
        self._tokens: tuple[bytes, ...] = ()
        self.replace(tokens)

    def replace(self, tokens: Iterable[str] | None) -> None:
        self._tokens = tuple(sorted(t.encode() for t in tokens or ()))

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def accepts(self, presented: bytes | None) -> bool:
        if presented is None:
            return False
        found = False
        for token in self._tokens:  # no early exit: every token is compared
            found |= hmac.compare_digest(token, presented)
        return found


def presented_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the call's ``authorization: Bearer <token>``, if any."""
    for key, value in metadata or ():
        if key == CREDENTIAL_KEY:
            text = value if isinstance(value, bytes) else value.encode()
            if text[:len(_SCHEME)].lower() == _SCHEME.encode():
                return text[len(_SCHEME):].strip()
            return None
    return None


class WithoutCredential:
    """A call's context whose metadata lacks ``authorization``, for handlers that forward
    the metadata to Triton: a token meant for the router does not reach every instance."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(item for item in self._context.invocation_metadata() or ()
                     if item[0] != CREDENTIAL_KEY)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _without_credential(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour given a :class:`WithoutCredential` context."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            break
    wrapped: Callable[..., Any]
    if inspect.isasyncgenfunction(behaviour):
        async def generating(request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[Any]:
            async for response in behaviour(request, WithoutCredential(context)):
                yield response
        wrapped = generating
    else:
        async def calling(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(request, WithoutCredential(context))
        wrapped = calling
    return handler._replace(**{kind: wrapped})  # grpc's handlers are namedtuples


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses, without reading
    (or deserializing) what the caller sent."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Let a call through if it carries a token of any of ``tokens``; else UNAUTHENTICATED.

    Methods starting with one of ``open_prefixes`` need no token. With ``strip``, the
    handlers of the calls let through do not see (nor forward) ``authorization``.
    """

    def __init__(self, tokens: Iterable[Tokens], message: str,
                 open_prefixes: tuple[str, ...] = (), *, strip: bool = False):
        self.tokens = tuple(tokens)
        self.message = message
        self.open_prefixes = open_prefixes
        self.strip = strip

    async def intercept_service(
            self,
            continuation: Callable[[grpc.HandlerCallDetails],
                                   Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_prefixes):
            return handler
        presented = presented_token(details.invocation_metadata)
        if any(t.accepts(presented) for t in self.tokens):
            return _without_credential(handler) if self.strip else handler
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, self.message)


def data_plane_message() -> str:
    return ("tritonmesh needs a token: send 'authorization: Bearer <token>' with a token "
            "from auth.data_tokens_file (tritonclient: headers={'authorization': "
            "'Bearer <token>'})")


def admin_plane_message() -> str:
    return ("tritonmesh's admin API needs a token: send 'authorization: Bearer <token>' with "
            "a token from auth.admin_tokens_file (tritonmesh status --token-file FILE)")


class ControlAccess:
    """The check in front of each control RPC on the data listener."""

    def __init__(self, admin_tokens: Tokens):
        self.admin_tokens = admin_tokens

    async def check(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Return if the call carries an admin token; else abort with PERMISSION_DENIED."""
        if self.admin_tokens.accepts(presented_token(context.invocation_metadata())):
            return
        how = ("send 'authorization: Bearer <token>' with a token from "
               "auth.admin_tokens_file" if self.admin_tokens.configured
               else "configure auth.admin_tokens_file in the router's config and send one of "
                    "its tokens as 'authorization: Bearer <token>'")
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is restricted: it changes every Triton instance behind tritonmesh; "
            f"{how}")
