"""The demo's three domains, built on the spot from what every Python installation has.

- ``prose``: English docstrings of standard-library modules and their public members;
- ``code``: the source of standard-library modules with comments and docstrings removed
  (``ast.unparse``), so it shares no prose with the first domain;
- ``arithmetic``: synthetic sums, differences and products, ``"347+59=406\\n"``.

Text becomes bytes (a 256-token vocabulary); each domain's stream is split into a training part
(the first 90 %) and a held-out part from which fixed evaluation windows are cut. Everything is
deterministic for a seed and a Python version (the standard library differs slightly between
versions, so the numbers do too).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import random
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

DOMAINS = ("prose", "code", "arithmetic")

# Modules read for prose and for code: common, pure-Python, present in every CPython >= 3.10.
_PROSE_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
                  "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gettext",
                  "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mimetypes",
                  "numbers", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
                  "secrets", "shlex", "shutil", "statistics", "string", "struct", "subprocess", "tarfile",
                  "tempfile", "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "uuid",
                  "warnings", "weakref", "zipfile")
_CODE_MODULES = ("argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser", "contextlib",
                 "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob",
                 "heapq", "hmac", "ipaddress", "json.decoder", "json.encoder", "linecache", "mimetypes", "ntpath",
                 "numbers", "operator", "optparse", "pathlib", "posixpath", "pprint", "queue", "quopri", "random",
                 "sched", "selectors", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap",
                 "threading", "tokenize", "traceback", "uuid", "weakref", "zipfile")


def _import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ImportError:  # a module a distribution left out: the text is a little shorter
            return None


def prose_text(limit: int) -> str:
    """Docstrings of the modules above, their public classes, functions and methods (sorted, no repeats)."""
    seen, parts = set(), []
    for name in _PROSE_MODULES:
        mod = _import(name)
        if mod is None:
            continue
        objects = [mod]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [v for m, v in sorted(vars(obj).items()) if not m.startswith("_")]
        for obj in objects:
            obj = getattr(obj, "__func__", obj)  # classmethod / staticmethod
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) \
                else None
            if doc and doc not in seen and doc.isascii():
                seen.add(doc)
                parts.append(doc)
        if sum(map(len, parts)) >= limit:
            break
    return "\n\n".join(parts)[:limit]


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def code_text(limit: int) -> str:
    """Source of the modules above without docstrings or comments."""
    parts = []
    for name in _CODE_MODULES:
        mod = _import(name)
        try:
            source = inspect.getsource(mod) if mod is not None else None
        except (OSError, TypeError):  # no source shipped (e.g. a .pyc-only install)
            source = None
        if source is None:
            continue
        parts.append(ast.unparse(_StripDocstrings().visit(ast.parse(source))))
        if sum(map(len, parts)) >= limit:
            break
    return "\n\n".join(parts)[:limit]


def arithmetic_text(limit: int, seed: int) -> str:
    """Lines ``a<op>b=c`` with a, b < 1000 and op in + - *, drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < limit:
        a, b, op = rng.randrange(1000), rng.randrange(1000), rng.choice("+-*")
        c = a + b if op == "+" else a - b if op == "-" else a * b
        line = f"{a}{op}{b}={c}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)[:limit]


@dataclass
class Domain:
    """One domain: byte tokens for training and fixed held-out windows ``[n_eval, seq_len + 1]``."""

    name: str
    train: Tensor   # uint8 [N]
    eval: Tensor    # int64 [n_eval, seq_len + 1]

    def batches(self, steps: int, batch_size: int, seq_len: int, generator: torch.Generator):
        """``steps`` random training windows ``[batch_size, seq_len + 1]`` (int64)."""
        span = torch.arange(seq_len + 1)
        for _ in range(steps):
            start = torch.randint(0, self.train.numel() - seq_len - 1, (batch_size,), generator=generator)
            yield self.train[start[:, None] + span].to(torch.int64)


def _tokens(text: str) -> Tensor:
    return torch.frombuffer(bytearray(text.encode("ascii", "replace")), dtype=torch.uint8)


def make_domains(*, chars: int, seq_len: int, n_eval: int, seed: int) -> list[Domain]:
    """The three domains, each of ``chars`` characters; evaluation windows from the last 10 %."""
    texts = {"prose": prose_text(chars), "code": code_text(chars), "arithmetic": arithmetic_text(chars, seed)}
    out = []
    for name in DOMAINS:
        tokens = _tokens(texts[name])
        cut = tokens.numel() * 9 // 10
        held = tokens[cut:]
        if held.numel() < seq_len + 1 or cut < seq_len + 1:
            raise ValueError(f"retain demo: the {name} domain has {tokens.numel()} characters, too few for "
                             f"seq_len={seq_len}")
        g = torch.Generator().manual_seed(seed + 1)
        start = torch.randint(0, held.numel() - seq_len, (n_eval,), generator=g)
        out.append(Domain(name, tokens[:cut], held[start[:, None] + torch.arange(seq_len + 1)].to(torch.int64)))
    return out
