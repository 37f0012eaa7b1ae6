"""Tools (function calling) for any model, whether or not its chat template knows about them.

The tools are described in a system message, with how to call one: reply with only
{"name": ..., "arguments": {...}}. When the request forces a call (tool_choice "required" or a
named function), the output is constrained to a JSON schema that only such calls match, so it
always parses; with "auto" the model answers freely, and an answer that parses as a call to one of
the tools becomes a tool call. Calls and results sent back in the history become plain text turns
(see convert.py), so every template can render them. The engines only enforce the schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from infersnap import json_schema
from infersnap.frontend import schema
from infersnap.frontend.errors import APIError

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolSet:
    """The tools a request offers the model, and which of them it must call."""

    def __init__(
        self, functions: list[schema.FunctionDefinition], parameters: list[dict[str, Any]], forced: list[str] | None
    ) -> None:
        self.functions = {f.name: f for f in functions}  # as given: their descriptions are for the model
        self.parameters = {f.name: p for f, p in zip(functions, parameters)}  # normalized: what is enforced
        self.forced = forced  # a call to one of these is the only answer allowed; None: text is fine too

    def instructions(self) -> str:
        """The system message text that tells the model about the tools."""
        lines = ["You can use these tools:"]
        for f in self.functions.values():
            about = f" {f.description}" if f.description else ""
            parameters = f.parameters if f.parameters is not None else NO_ARGUMENTS
            lines.append(f"- {f.name}:{about} Its arguments follow this JSON schema: {_dumps(parameters)}")
        lines.append(
            'To use a tool, reply with only a JSON object, nothing before or after it: '
            '{"name": "<tool name>", "arguments": {<the arguments>}}'
        )
        if self.forced is None:
            lines.append("Use a tool only when you need one to answer; otherwise answer normally.")
        elif len(self.forced) == 1:
            lines.append(f"Reply now with a call to {self.forced[0]}.")
        else:
            lines.append("Reply now with a call to one of the tools.")
        return "\n".join(lines)

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema a forced call's output must follow (one branch per allowed tool); None if not forced."""
        if self.forced is None:
            return None
        defs: dict[str, Any] = {}
        calls = [self._call_schema(name, f"tool{i}", defs) for i, name in enumerate(self.forced)]
        constraint = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if defs:
            constraint["$defs"] = defs
        return constraint

    def _call_schema(self, name: str, key: str, defs: dict[str, Any]) -> dict[str, Any]:
        # The parameters' own "#/..." references pointed at their root, which now sits at #/$defs/<key>.
        arguments = json_schema.rebase(self.parameters[name], f"#/$defs/{key}")
        if arguments != self.parameters[name]:  # it has references
            defs[key] = arguments
        return {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    def parse(self, text: str) -> schema.ToolCall | None:
        """The tool call that the whole answer is, if it is one (a fenced ```json block counts)."""
        body = text.strip()
        if body.startswith("```") and body.endswith("```") and len(body) >= 6:
            body = body[3:-3].removeprefix("json").strip()
        try:
            call = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json goes
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        if not isinstance(call.get("arguments"), dict):
            return None
        if call["name"] not in (self.functions if self.forced is None else self.forced):
            return None
        function = schema.FunctionCall(call["name"], _dumps(call["arguments"]))
        return schema.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=function)

    def could_be_call(self, text: str) -> bool:
        """Whether an unfinished answer may still turn out to be a tool call (while it may, it is not streamed)."""
        head = text.lstrip()
        if head.startswith("{") or "```".startswith(head):
            return True
        if not head.startswith("```"):
            return False
        # A fenced call is ```json (or a bare fence) around an object: a code block in any other language,
        # or one whose first line is not `{`, is an answer, and streams as soon as that shows.
        info, newline, rest = head[3:].partition("\n")
        if not newline:
            return "json".startswith(info.strip().lower())
        return info.strip().lower() in ("", "json") and (not rest.strip() or rest.lstrip().startswith("{"))


def from_request(body: schema.ChatCompletionRequest) -> ToolSet | None:
    """The request's tools, or None when it has none or tool_choice is "none"; a 400 for a bad combination."""
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if choice == "none" or (choice == "auto" and not body.tools):
        return None
    if not body.tools:
        message = f"tool_choice {_choice_name(choice)} needs tools, and the request has none"
        raise APIError(400, message, param="tool_choice")
    seen: set[str] = set()
    parameters = []
    for i, tool in enumerate(body.tools):
        name = tool.function.name
        if name in seen:
            raise APIError(400, f"two tools are named {name!r}", param=f"tools[{i}].function.name")
        seen.add(name)
        given = tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS
        parameters.append(normalized(given, f"tools[{i}].function.parameters"))
    if isinstance(choice, schema.NamedToolChoice):
        if choice.function.name not in seen:
            raise APIError(
                400, f"tool_choice names {choice.function.name!r}, which is not one of the tools", param="tool_choice"
            )
        forced: list[str] | None = [choice.function.name]
    else:
        forced = [t.function.name for t in body.tools] if choice == "required" else None
    return ToolSet([t.function for t in body.tools], parameters, forced)


def normalized(value: dict[str, Any], param: str) -> dict[str, Any]:
    """The schema as the engines enforce it (see infersnap.json_schema); a 400 naming `param` if it can't be."""
    try:
        return json_schema.normalize(value)
    except ValueError as exc:
        raise APIError(400, f"{param} is not a JSON schema that can be enforced: {exc}", param=param) from None
    except RecursionError:
        raise APIError(400, f"{param} is nested too deeply", param=param) from None


def call_text(call: schema.ToolCall) -> str:
    """An earlier call as the model wrote it, for the prompt."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except (ValueError, RecursionError):
        arguments = call.function.arguments
    return _dumps({"name": call.function.name, "arguments": arguments})


def result_text(name: str, content: str) -> str:
    """A tool's result, for the prompt (as a user turn: templates know no tool role)."""
    return f"Tool result ({name}): {content}"


def _choice_name(choice: str | schema.NamedToolChoice) -> str:
    return repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
