"""``qmesh memory …``: the graph memory from the shell, on the data
directory's state store (like ``qmesh apps``), without a running Gate.

For: ``add FILE…`` (format from the extension unless ``--format``; the id
is the file name without its extension unless ``--id``; ``--shared`` lets
every app read them), ``ask "…"`` (the answer with numbered citations,
each with the references it resolved, "it → Acme Corporation", and a note
when sources disagree; exit status 1 when the answer is "not found", so
scripts can tell), ``delete
DOC_ID``, ``share DOC_ID`` (``--off`` to stop), ``list`` and ``check`` (the
provenance integrity check over the whole store). The shell is the
operator's: these commands see and change every app's documents.

Not for: parsing the global options or loading the configuration
(:mod:`qmesh.cli` does both and hands the handlers a :class:`Config`). The
memory modules are imported inside the handlers so that ``qmesh --help``
and the other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

from qmesh.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    add_command,
    iso_seconds,
    print_err,
)

if TYPE_CHECKING:
    from qmesh.config import Config
    from qmesh.memory.service import Memory
    from qmesh.state import StateStore

__all__ = ["add_commands"]

EXIT_NOT_FOUND: Final = EXIT_FAILURE
"""``ask``: no stored sentence supports an answer."""
EXIT_PROBLEMS: Final = EXIT_FAILURE
"""``check``: a stored fact has no source."""
_EXTENSIONS: Final = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    memory = add_command(
        commands,
        common,
        "memory",
        "graph memory: add documents, ask questions answered with citations",
    )
    memory_commands = memory.add_subparsers(dest="memory_command", metavar="COMMAND", required=True)

    add = memory_commands.add_parser(
        "add", parents=[common], help="add documents (text, Markdown or HTML files)"
    )
    add.add_argument("files", nargs="+", type=Path, metavar="FILE")
    add.add_argument(
        "--format",
        choices=("auto", "text", "markdown", "html"),
        default="auto",
        help="default: from the extension (.md markdown, .html html, else text)",
    )
    add.add_argument(
        "--id", dest="document_id", metavar="DOC_ID", help="document id (only with one FILE)"
    )
    add.add_argument("--title", help="document title (default: its first heading)")
    add.add_argument(
        "--replace", action="store_true", help="replace a different document with the same id"
    )
    add.add_argument(
        "--shared", action="store_true", help="let every app read them (default: only admin)"
    )
    add.set_defaults(handler=_cmd_add)

    ask = memory_commands.add_parser(
        "ask", parents=[common], help="answer a question with numbered citations"
    )
    ask.add_argument("question")
    ask.add_argument("--limit", type=int, default=10, metavar="N", help="facts to show (1-100)")
    ask.add_argument("--facts", action="store_true", help="also print the facts found")
    ask.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    ask.set_defaults(handler=_cmd_ask)

    delete = memory_commands.add_parser(
        "delete", parents=[common], help="delete a document and the facts only it supports"
    )
    delete.add_argument("document_id", metavar="DOC_ID")
    delete.set_defaults(handler=_cmd_delete)

    share = memory_commands.add_parser(
        "share", parents=[common], help="let every app read a document (--off: only its owner)"
    )
    share.add_argument("document_id", metavar="DOC_ID")
    share.add_argument("--off", action="store_true", help="stop sharing it")
    share.set_defaults(handler=_cmd_share)

    listing = memory_commands.add_parser("list", parents=[common], help="list stored documents")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)

    memory_commands.add_parser(
        "check", parents=[common], help="check that every stored fact has a source"
    ).set_defaults(handler=_cmd_check)


def _open(config: Config) -> tuple[StateStore, Memory]:
    from qmesh.memory.service import Memory
    from qmesh.state import StateStore

    store = StateStore.open(config.state_location)
    return store, Memory(store, max_document_bytes=config.gate.memory.max_document_bytes)


def _default_id(path: Path) -> str | None:
    name = path.name
    for suffix in reversed(path.suffixes):
        name = name.removesuffix(suffix)
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")[:128]
    return cleaned or None


def _cmd_add(args: argparse.Namespace, config: Config) -> int:
    from qmesh.memory.errors import GraphMemoryError

    files: list[Path] = args.files
    if args.document_id is not None and len(files) != 1:
        print_err("error: --id needs exactly one FILE")
        return EXIT_USAGE
    status = EXIT_OK
    store, memory = _open(config)
    with store:
        for path in files:
            fmt = args.format
            if fmt == "auto":
                fmt = _EXTENSIONS.get(path.suffix.lower(), "text")
            try:
                # utf-8-sig: a byte-order mark is not part of the text.
                text = path.read_bytes().decode("utf-8-sig")
            except OSError as exc:
                print_err(f"error: {path}: {exc.strerror or exc}")
                status = EXIT_USAGE
                continue
            except UnicodeDecodeError as exc:
                print_err(f"error: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})")
                status = EXIT_USAGE
                continue
            document_id = args.document_id or _default_id(path)
            try:
                report = memory.add(
                    text,
                    format=fmt,
                    document_id=document_id,
                    title=args.title,
                    shared=True if args.shared else None,
                    replace=args.replace,
                )
            except GraphMemoryError as exc:
                print_err(f"error: {path}: {exc}")
                status = EXIT_USAGE
                continue
            if not report.created:
                print(f"unchanged {report.document_id} (the same text is already stored)")
                continue
            verb = "replaced" if report.replaced else "added"
            print(
                f"{verb} {report.document_id}: {report.sentences} sentences, "
                f"{report.mentions} mentions, {report.relations} relations"
            )
    return status


def _cmd_ask(args: argparse.Namespace, config: Config) -> int:
    from qmesh.memory.errors import GraphMemoryError
    from qmesh.memory.records import OPERATOR

    store, memory = _open(config)
    with store:
        try:
            answer = memory.ask(args.question, args.limit, access=OPERATOR)
        except GraphMemoryError as exc:
            print_err(f"error: {exc}")
            return EXIT_USAGE
    if args.json:
        print(json.dumps(answer.to_json(), indent=2, ensure_ascii=False))
        return EXIT_OK if answer.found else EXIT_NOT_FOUND
    if not answer.found:
        print("not found")
        known = f" (known entities in the question: {', '.join(answer.entities)})"
        print(f"no stored sentence supports an answer{known if answer.entities else ''}")
    else:
        print(answer.answer)
        print()
        used = {int(n) for n in re.findall(r"\[(\d+)\]", answer.answer)}
        # The sources of a competing value too, so that a reader can check both.
        used |= {n for conflict in answer.conflicts for _, ns in conflict.values for n in ns}
        for citation in answer.citations:
            if citation.n in used:
                print(
                    f"[{citation.n}] {citation.document_id} "
                    f"[{citation.start}:{citation.end}] {citation.text}"
                )
                for resolution in citation.resolutions:
                    print(
                        f"    {resolution.text} → {resolution.entity} "
                        f"[{resolution.start}:{resolution.end}]"
                    )
        for conflict in answer.conflicts:
            values = "; ".join(
                f"{value} {''.join(f'[{n}]' for n in ns)}" for value, ns in conflict.values
            )
            print(f"note: sources disagree on {conflict.about} / {conflict.predicate}: {values}")
    if args.facts and answer.facts:
        print()
        print("facts:")
        for fact in answer.facts:
            cites = "".join(f"[{c.n}]" for c in fact.citations)
            print(f"  {fact.subject} | {fact.predicate} | {fact.object} {cites}")
    return EXIT_OK if answer.found else EXIT_NOT_FOUND


def _cmd_delete(args: argparse.Namespace, config: Config) -> int:
    from qmesh.memory.errors import GraphMemoryError
    from qmesh.memory.records import OPERATOR

    store, memory = _open(config)
    with store:
        try:
            report = memory.delete(args.document_id, access=OPERATOR)
        except GraphMemoryError as exc:
            print_err(f"error: {exc} (see `qmesh memory list`)")
            return EXIT_USAGE
    print(
        f"deleted {report.document_id}: {report.sentences} sentences; "
        f"removed {report.entities_removed} entities and {report.relations_removed} relations "
        f"supported only by it; kept {report.relations_kept} relations with other sources"
    )
    return EXIT_OK


def _cmd_share(args: argparse.Namespace, config: Config) -> int:
    from qmesh.memory.errors import GraphMemoryError
    from qmesh.memory.records import OPERATOR

    store, memory = _open(config)
    with store:
        try:
            memory.share(args.document_id, not args.off, access=OPERATOR)
        except GraphMemoryError as exc:
            print_err(f"error: {exc} (see `qmesh memory list`)")
            return EXIT_USAGE
    if args.off:
        print(f"{args.document_id} is no longer shared: only its owner (and admin) can read it")
    else:
        print(f"{args.document_id} is shared: every app can read it")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    from qmesh.memory.records import OPERATOR

    store, memory = _open(config)
    with store:
        documents = memory.documents(access=OPERATOR)
    if args.json:
        rows = [
            {
                "id": d.id,
                "title": d.title,
                "format": d.format,
                "chars": d.chars,
                "sentences": d.sentences,
                "added_by": d.added_by,
                "shared": d.shared,
                "created_at": iso_seconds(d.created_at),
            }
            for d in documents
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not documents:
        print("no documents (see `qmesh memory add --help`)")
        return EXIT_OK
    width = max(len("ID"), *(len(d.id) for d in documents))
    owners = [(d.added_by or "(operator)") + (" shared" if d.shared else "") for d in documents]
    owner_width = max(len("OWNER"), *(len(o) for o in owners))
    print(
        f"{'ID':<{width}}  {'FORMAT':<8}  {'SENTENCES':>9}  {'OWNER':<{owner_width}}  "
        f"{'ADDED':<25}  TITLE"
    )
    for d, owner in zip(documents, owners, strict=True):
        print(
            f"{d.id:<{width}}  {d.format:<8}  {d.sentences:>9}  {owner:<{owner_width}}  "
            f"{iso_seconds(d.created_at):<25}  {d.title or ''}"
        )
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, config: Config) -> int:
    store, memory = _open(config)
    with store:
        problems = memory.store.integrity_problems()
    bad = {name: count for name, count in problems.items() if count}
    if not bad:
        print("ok: every entity and relation has a stored source sentence")
        return EXIT_OK
    for name, count in bad.items():
        print(f"{name}: {count}")
    return EXIT_PROBLEMS
