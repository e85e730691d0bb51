"""A renderer for the subset of Go's text/template that Ollama templates use, for tests only.

Go itself is not installed where the tests run. This follows text/template's rules for
what the Modelfile templates of :mod:`ftmagic.export.ollama` use: text, ``{{ pipeline }}``
with ``{{-`` / ``-}}`` trimming (all whitespace next to the action, newlines included),
``range``, ``if`` / ``else if`` / ``else`` / ``end``, fields (``.Role``, ``$.Messages``),
parenthesised calls, string and integer literals, and the functions ``eq``, ``ne``,
``and``, ``or``, ``not``, ``index``, ``len``. Anything else raises, so a template using
more than this subset fails the test instead of rendering wrongly.

Example::

    render_go("{{- range .Messages }}{{ .Content }}\\n{{ end }}", {"Messages": [{"Role": "user", "Content": "hi"}]})
    # 'hi\\n'
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


def render_go(template: str, data: dict) -> str:
    nodes = _parse(_lex(template))
    out: list = []
    _run(nodes, data, data, out)
    return "".join(out)


def _lex(template: str) -> list:
    tokens, pos = [], 0
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", match.group(2).strip(), bool(match.group(3))))
        pos = match.end()
    tokens.append(("text", template[pos:]))
    # A right trim marker removes the whitespace at the start of the following text.
    for i, token in enumerate(tokens):
        if token[0] == "action" and token[2]:
            kind, text = tokens[i + 1]
            tokens[i + 1] = (kind, text.lstrip(" \t\r\n"))
    return [(t[0], t[1]) for t in tokens]


def _parse(tokens: list) -> list:
    stack: list = [[]]
    blocks: list = []
    for kind, value in tokens:
        if kind == "text":
            if value:
                stack[-1].append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("if", "range"):
            node = {"kind": word, "branches": [(value[len(word):].strip(), [])], "else": None}
            stack[-1].append(("block", node))
            blocks.append(node)
            stack.append(node["branches"][0][1])
        elif value.startswith("else if "):
            stack.pop()
            body: list = []
            blocks[-1]["branches"].append((value[len("else if "):].strip(), body))
            stack.append(body)
        elif value == "else":
            stack.pop()
            blocks[-1]["else"] = []
            stack.append(blocks[-1]["else"])
        elif value == "end":
            stack.pop()
            blocks.pop()
        elif value.startswith("/*"):
            continue
        else:
            stack[-1].append(("expr", value))
    if blocks:
        raise ValueError("unclosed block in template")
    return stack[0]


def _run(nodes: list, dot, root: dict, out: list) -> None:
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "expr":
            out.append(_show(_eval(value, dot, root)))
        else:
            node = value
            if node["kind"] == "range":
                items = _eval(node["branches"][0][0], dot, root) or []
                if items:
                    for item in items:
                        _run(node["branches"][0][1], item, root, out)
                elif node["else"] is not None:
                    _run(node["else"], dot, root, out)
                continue
            for condition, body in node["branches"]:
                if _truthy(_eval(condition, dot, root)):
                    _run(body, dot, root, out)
                    break
            else:
                if node["else"] is not None:
                    _run(node["else"], dot, root, out)


def _show(value) -> str:
    if value is None:
        return "<no value>"
    return str(value)


def _truthy(value) -> bool:
    return bool(value)


_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _eval(expression: str, dot, root: dict):
    tokens = _TOKEN.findall(expression)
    value, rest = _command(tokens, dot, root)
    if rest:
        raise ValueError(f"unsupported template syntax: {expression!r}")
    return value


def _command(tokens: list, dot, root):
    """A command: a function with arguments, or a single operand; stops at ``)``."""
    args, i = [], 0
    while i < len(tokens) and tokens[i] != ")":
        operand, used = _operand(tokens[i:], dot, root)
        args.append(operand)
        i += used
    if not args:
        raise ValueError("empty command")
    head = args[0]
    if callable(head):
        return head(*args[1:]), tokens[i:]
    if len(args) > 1:
        raise ValueError("only functions take arguments")
    return head, tokens[i:]


def _operand(tokens: list, dot, root):
    token = tokens[0]
    if token == "(":
        value, rest = _command(tokens[1:], dot, root)
        if not rest or rest[0] != ")":
            raise ValueError("unbalanced parentheses")
        used = len(tokens) - len(rest) + 1
        # A field chain right after the parenthesis, e.g. (index .Messages 0).Role
        if used < len(tokens) and tokens[used].startswith(".") and tokens[used] != ".":
            value = _fields(value, tokens[used])
            used += 1
        return value, used
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), 1
    if token == ".":
        return dot, 1
    if token.startswith("$."):
        return _fields(root, token[1:]), 1
    if token.startswith("."):
        return _fields(dot, token), 1
    if token in _FUNCTIONS:
        return _FUNCTIONS[token], 1
    raise ValueError(f"unsupported token {token!r}")


def _fields(value, chain: str):
    for name in chain.strip(".").split("."):
        if isinstance(value, dict):
            if name not in value:
                raise KeyError(f"no field {name}")
            value = value[name]
        else:
            value = getattr(value, name)
    return value


def _and(*values):
    for value in values:
        if not _truthy(value):
            return value
    return values[-1]


def _or(*values):
    for value in values:
        if _truthy(value):
            return value
    return values[-1]


_FUNCTIONS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "and": _and,
    "or": _or,
    "not": lambda a: not _truthy(a),
    "index": lambda seq, *keys: _index(seq, keys),
    "len": len,
}


def _index(seq, keys):
    for key in keys:
        seq = seq[key]
    return seq
