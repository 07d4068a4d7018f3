#!/usr/bin/env python3
"""Build ``data/chat/``: questions about the Python standard library answered by its own docstrings.

A small, offline instruction/chat corpus for ``type: chat_template`` (``yaml_examples/chat_mft.yml``):
every public top-level function of a top-level module of ``/usr/lib/python3.11`` (Debian
``libpython3.11-minimal``/``libpython3.11-stdlib``, the system Python of Debian 12) that has a
docstring becomes a question, ``What does `module.name(args)` do?``, answered by the docstring's
first paragraph (whitespace joined; 40 to 600 characters). A module's questions are paired in source
order into two-turn conversations (user, assistant, user, assistant; a last odd one stands alone).
Whole modules go to validation, in the order of ``sha256(module name)``, until it holds 10% of the
conversations; so no function is both trained on and validated.

    python scripts/build_chat_corpus.py            # writes data/chat/{train,validation}.jsonl
    python scripts/build_chat_corpus.py --check    # rebuilds in memory and compares with data/chat/

Only the standard library's source is read (with ``ast``; nothing is imported or run); the output
is a function of the package version alone (printed), byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

STDLIB = Path("/usr/lib/python3.11")
OUT = Path(__file__).resolve().parents[1] / "data" / "chat"
PACKAGES = ["libpython3.11-minimal", "libpython3.11-stdlib"]
SKIPPED = {"this.py", "antigravity.py"}
MIN_ANSWER, MAX_ANSWER = 40, 600
VALID_SHARE = 0.10


def signature(node: ast.FunctionDef) -> str:
    """``name(a, b=..., *args, **kwargs)`` from the source: parameter names only, defaults as ``...``."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    names = [a.arg for a in positional]
    for i in range(len(args.defaults)):
        names[len(names) - len(args.defaults) + i] += "=..."
    if args.vararg:
        names.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg + ("=..." if d is not None else "") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        names.append(f"**{args.kwarg.arg}")
    return f"{node.name}({', '.join(names)})"


def questions(module: Path) -> list[tuple[str, str]]:
    """(question, answer) for each public documented top-level function, in source order."""
    tree = ast.parse(module.read_text("utf-8"))
    pairs = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        answer = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""
        if MIN_ANSWER <= len(answer) <= MAX_ANSWER:
            pairs.append((f"What does `{module.stem}.{signature(node)}` do?", answer))
    return pairs


def conversations(module: Path) -> list[dict]:
    pairs = questions(module)
    return [
        {"messages": [m for q, a in pairs[i : i + 2] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}
        for i in range(0, len(pairs), 2)
    ]


def build() -> dict[str, str]:
    modules = sorted(p for p in STDLIB.glob("*.py") if not p.name.startswith("_") and p.name not in SKIPPED)
    by_module = {p.stem: conversations(p) for p in modules}
    total = sum(map(len, by_module.values()))
    valid, held = set(), 0
    for name in sorted(by_module, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if held >= total * VALID_SHARE:
            break
        valid.add(name)
        held += len(by_module[name])
    lines = {"train": [], "validation": []}
    for name in sorted(by_module):
        for conversation in by_module[name]:
            lines["validation" if name in valid else "train"].append(json.dumps(conversation, ensure_ascii=False))
    return {split: "".join(line + "\n" for line in rows) for split, rows in lines.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a rebuild with data/chat/ instead of writing")
    args = parser.parse_args()
    for package in PACKAGES:
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True).stdout
        print(f"{package} {version or '(not installed)'}")
    built = build()
    if args.check:
        differ = [split for split, text in built.items() if (OUT / f"{split}.jsonl").read_text("utf-8") != text]
        print("identical" if not differ else f"differs: {', '.join(differ)}")
        return 1 if differ else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for split, text in built.items():
        (OUT / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{split}: {text.count(chr(10))} conversations, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
