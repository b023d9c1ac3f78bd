"""Running generations on Triton: the default max_tokens, n choices, and merged streams.

A request without max_tokens gets the room left in the context (capped by the gateway's
`default_max_tokens`). Only the engine's preprocessing knows the prompt's length (chat template
included), so the first call asks for the whole context and, when the engine answers that the
prompt does not leave that much room, the call is repeated with exactly the room it reports.
n choices are n concurrent Triton requests, which Triton's in-flight batching runs together.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from builder.serve.gateway.deployments import Deployment
from builder.serve.gateway.errors import ApiError, bad_request, unsupported
from builder.serve.gateway.params import ENGINE_EXTRAS, extras_in
from builder.serve.gateway.responses import Usage
from builder.serve.gateway.triton_client import TritonClient, TritonStream

T = TypeVar("T")
_TOO_LONG = re.compile(r"the prompt has (\d+) tokens and max_tokens is (\d+)")
FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class Plan:
    """One Triton generation: every JSON field but max_tokens, and how max_tokens is chosen."""

    dep: Deployment
    body: dict[str, Any]
    max_tokens: int | None          # None: the room left in the context
    cap: int | None = None          # upper bound for the default
    prompt_index: int = 0           # which prompt of the request (usage counts each prompt once)
    prompt_param: str = "messages"  # what a too-long prompt's error names

    def named(self, error: ApiError) -> ApiError:
        """Give a context-size, penalty or response_format refusal the `param` it is about."""
        if error.status == 400 and error.param is None:
            if "the prompt has" in error.message:
                error.param = self.prompt_param
            elif error.message.startswith("max_tokens"):
                error.param = "max_tokens"
            elif error.message.startswith(("presence_penalty", "frequency_penalty")):
                error.param = error.message.split(" ", 1)[0]
            elif "guided_decoding_guide" in error.message:
                error.param = "response_format"
                error.message = (error.message.replace("guided_decoding_guide_type", "response_format.type")
                                 .replace("guided_decoding_guide", "response_format.json_schema.schema"))
        return error

    @property
    def context(self) -> int:
        return self.dep.context_size or FALLBACK_CONTEXT

    def first_max_tokens(self) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return min(self.cap, self.context - 1) if self.cap else self.context - 1

    def room_after(self, error: ApiError) -> int | None:
        """For a defaulted max_tokens refused as too long: the room the prompt leaves."""
        match = _TOO_LONG.search(error.message) if error.status == 400 else None
        if self.max_tokens is not None or match is None:
            return None
        prompt = int(match.group(1))
        room = self.context - prompt
        if room < 1:
            raise bad_request(f"the prompt has {prompt} tokens, which leaves no room in the context size of "
                              f"{self.context} tokens: shorten it", self.prompt_param, code="context_length_exceeded")
        return min(room, self.cap) if self.cap else room


async def check_extras(triton: TritonClient, model: str, body: dict[str, Any], dep: Deployment) -> None:
    """Refuse engine extras the Triton model does not declare (Triton would ignore them silently)."""
    wanted = extras_in(body)
    if wanted:
        have = await triton.input_names(model)
        for name in wanted:
            if name not in have:
                param = ENGINE_EXTRAS[name]
                raise unsupported(param, f"the repository of {dep.id} was built before the engines applied "
                                         f"{param} (its Triton model {model} has no {name} input): rebuild it "
                                         "with build-engines to use it")


async def generate(triton: TritonClient, plan: Plan) -> dict[str, Any]:
    """One complete generation, retried once with the exact room when max_tokens was defaulted."""
    await check_extras(triton, plan.dep.infer, plan.body, plan.dep)
    try:
        return await triton.generate(plan.dep.infer, {**plan.body, "max_tokens": plan.first_max_tokens()})
    except ApiError as e:
        room = plan.room_after(e)
        if room is None:
            raise plan.named(e) from None
    try:
        return await triton.generate(plan.dep.infer, {**plan.body, "max_tokens": room})
    except ApiError as e:
        raise plan.named(e) from None


async def open_stream(triton: TritonClient, plan: Plan) -> tuple[TritonStream, dict[str, Any] | None]:
    """An open stream and its first event, so that a refused request is still a plain HTTP error."""
    model = plan.dep.stream or plan.dep.infer
    await check_extras(triton, model, plan.body, plan.dep)
    max_tokens = plan.first_max_tokens()
    for attempt in range(2):
        try:
            return await _open_and_peek(triton, model, {**plan.body, "max_tokens": max_tokens})
        except ApiError as e:
            room = plan.room_after(e) if attempt == 0 else None
            if room is None:
                raise plan.named(e) from None
            max_tokens = room
    raise AssertionError("unreachable")


async def _open_and_peek(triton: TritonClient, model: str, body: dict[str, Any]) -> tuple[TritonStream, dict[str, Any] | None]:
    stream = await triton.open_stream(model, body)
    try:
        return stream, await stream.next()
    except BaseException:
        await stream.aclose()
        raise


async def all_of(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]   # type: ignore[arg-type]
    except BaseExceptionGroup as eg:
        api = [e for e in eg.exceptions if isinstance(e, ApiError)]
        raise (api[0] if api else eg.exceptions[0]) from None
    return [t.result() for t in tasks]


async def open_streams(triton: TritonClient, plans: list[Plan]) -> list[tuple[TritonStream, dict[str, Any] | None]]:
    """Open every stream; if any is refused, close the ones already open."""
    opened: list[tuple[TritonStream, dict[str, Any] | None]] = []

    async def one(plan: Plan) -> tuple[TritonStream, dict[str, Any] | None]:
        pair = await open_stream(triton, plan)
        opened.append(pair)
        return pair

    try:
        return await all_of(one(p) for p in plans)
    except BaseException:
        await close_all(opened)
        raise


async def close_all(opened: list[tuple[TritonStream, dict[str, Any] | None]]) -> None:
    """Close every stream (again is harmless): Triton stops generating for each."""
    for stream, _ in opened:
        await stream.aclose()


async def merged(opened: list[tuple[TritonStream, dict[str, Any] | None]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(choice index, event) in arrival order until every stream ended; closes them all at the end."""
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None | BaseException]] = asyncio.Queue()

    async def pump(index: int, stream: TritonStream, first: dict[str, Any] | None) -> None:
        event = first
        try:
            while event is not None:
                await queue.put((index, event))
                event = await stream.next()
            await queue.put((index, None))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s, f)) for i, (s, f) in enumerate(opened)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await close_all(opened)


async def pieces(opened: list[tuple[TritonStream, dict[str, Any] | None]], plans: list[Plan],
                 usage: Usage) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice, new text, finish_reason or None) as the streams produce them: finish_reason comes
    exactly once per choice, as the last piece of that choice; usage is updated on the way."""
    finished: set[int] = set()
    async with contextlib.aclosing(merged(opened)) as events:
        async for index, ev in events:
            usage.add(plans[index].prompt_index, index, ev)
            text = str(ev.get("text_output") or "")
            reason = str(ev.get("finish_reason") or "") or None
            if index in finished:
                continue
            if text:
                yield index, text, None
            if reason:
                finished.add(index)
                yield index, "", reason
    if len(finished) < len(opened):
        raise ApiError(502, "Triton's stream ended before the generation finished", type="server_error",
                       code="bad_gateway")
