"""Memory belongs to apps: over the real HTTP API (loopback, real keys), an
app sees and changes only its own documents unless their owner shared them,
``admin`` sees and changes all, and nothing of a private document reaches
another app through a list, a read, a query, a delete report or a failed
write."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from statekit import close_after_the_test
from test_memory_api import Client

from qmesh.memory.api import add_routes
from qmesh.memory.errors import DocumentConflict, DocumentNotFound, NotDocumentOwner
from qmesh.memory.records import OPERATOR, SHARED_ONLY, Access
from qmesh.memory.service import Memory
from qmesh.state import MIGRATIONS, StateStore
from qmesh.state.memory_tables import SHARING_MIGRATION as MEMORY_SHARING_MIGRATION
from qmesh.web.auth import ADMIN_APP, AppAuthenticator
from qmesh.web.http import Router
from qmesh.web.native import serve_http

DOCS = "/v1/memory/documents"
ACME = "Acme Corporation was founded in 1998 by Jane Doe. Acme is headquartered in Springfield."
GLOBEX = "Globex was founded in 1989 by Hank Scorpio. Globex is based in Cypress Creek."


@pytest.fixture
async def apps(
    state_location: str | Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[Client, Client, Client, StateStore]]:
    state = close_after_the_test(StateStore.open(state_location))
    tokens = {app: f"{app}:{state.add_app(app)}" for app in ("app-a", "app-b", ADMIN_APP)}
    router = Router()
    add_routes(router, Memory(state), AppAuthenticator(state))
    port: int = await nursery.start(lambda task_status: serve_http(
        router, "127.0.0.1", 0, task_status=task_status))  # fmt: skip
    yield (
        Client(port, tokens["app-a"]),
        Client(port, tokens["app-b"]),
        Client(port, tokens[ADMIN_APP]),
        state,
    )


async def ids(client: Client) -> set[str]:
    reply = await client.call("GET", DOCS)
    assert reply.status == 200, reply.body
    return {d["id"] for d in reply.body["documents"]}


async def ask(client: Client, question: str) -> dict[str, Any]:
    reply = await client.call("POST", "/v1/memory/query", {"question": question})
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    return body


def cited_documents(answer: dict[str, Any]) -> set[str]:
    return {c["document_id"] for c in answer["citations"]} | {
        c["document_id"] for f in answer["facts"] for c in f["citations"]
    }


async def test_another_app_cannot_replace_a_document(
    apps: tuple[Client, Client, Client, StateStore],
) -> None:
    """App B once replaced app A's document with "replace": true."""
    a, b, admin, _ = apps
    assert (await a.call("POST", DOCS, {"id": "acme", "text": ACME})).status == 201
    # Private to app-a: the id is taken, and that is all app-b learns; with
    # the same text it does not even learn that the text is the same.
    for body in (
        {"id": "acme", "text": "Acme is in Shelbyville.", "replace": True},
        {"id": "acme", "text": "Acme is in Shelbyville."},
        {"id": "acme", "text": ACME},
        {"id": "acme", "text": ACME, "shared": True},
    ):
        refused = await b.call("POST", DOCS, body)
        assert refused.status == 409, refused.body
        assert refused.body["error"]["message"] == "the document id 'acme' is taken; choose another"
    # Shared: app-b may read it, and is told it is not its own to replace.
    assert (await a.call("PATCH", f"{DOCS}/acme", {"shared": True})).status == 200
    refused = await b.call("POST", DOCS, {"id": "acme", "text": "Acme is gone.", "replace": True})
    assert refused.status == 403 and refused.body["error"]["type"] == "permission_error"
    assert (await b.call("PATCH", f"{DOCS}/acme", {"shared": False})).status == 403
    stored = await a.call("GET", f"{DOCS}/acme")
    assert stored.body["text"] == ACME and stored.body["added_by"] == "app-a"
    # The owner replaces its own; admin may too, and the owner stays the owner.
    replaced = await a.call(
        "POST", DOCS, {"id": "acme", "text": "Acme is in Ohio.", "replace": True}
    )
    assert replaced.status == 201 and replaced.body["replaced"] is True
    by_admin = await admin.call(
        "POST", DOCS, {"id": "acme", "text": "Acme is in Utah.", "replace": True}
    )
    assert by_admin.status == 201 and by_admin.body["replaced"] is True
    after = await a.call("GET", f"{DOCS}/acme")
    assert after.body["text"] == "Acme is in Utah."
    assert after.body["added_by"] == "app-a" and after.body["shared"] is True


async def test_an_app_sees_only_its_own_and_shared_documents(
    apps: tuple[Client, Client, Client, StateStore],
) -> None:
    a, b, admin, _ = apps
    assert (await a.call("POST", DOCS, {"id": "acme", "text": ACME})).status == 201
    assert (await b.call("POST", DOCS, {"id": "globex", "text": GLOBEX})).status == 201
    assert await ids(a) == {"acme"}
    assert await ids(b) == {"globex"}
    assert await ids(admin) == {"acme", "globex"}
    assert (await b.call("GET", f"{DOCS}/acme")).status == 404
    assert (await b.call("DELETE", f"{DOCS}/acme")).status == 404
    assert (await b.call("PATCH", f"{DOCS}/acme", {"shared": True})).status == 404
    # A question about app-a's private document: nothing, not even a fact.
    hidden = await ask(b, "Who founded Acme?")
    assert hidden["found"] is False and hidden["entities"] == []
    assert cited_documents(hidden) <= {"globex"}
    del hidden["question"]
    assert "Acme" not in str(hidden)
    own = await ask(a, "Who founded Acme?")
    assert own["found"] is True and cited_documents(own) == {"acme"}
    assert cited_documents(await ask(admin, "Who founded Acme?")) == {"acme"}

    # Shared by its owner: readable and queryable by every app, changeable by none.
    shared = await a.call("PATCH", f"{DOCS}/acme", {"shared": True})
    assert shared.status == 200 and shared.body["shared"] is True
    assert await ids(b) == {"acme", "globex"}
    assert (await b.call("GET", f"{DOCS}/acme")).body["text"] == ACME
    assert cited_documents(await ask(b, "Who founded Acme?")) == {"acme"}
    assert (await b.call("DELETE", f"{DOCS}/acme")).status == 403
    # Unshared again: gone for app-b.
    assert (await a.call("PATCH", f"{DOCS}/acme", {"shared": False})).status == 200
    assert await ids(b) == {"globex"}
    unshared = await ask(b, "Who founded Acme?")
    del unshared["question"]
    assert "Acme" not in str(unshared)
    # Sharing at ingest, and admin deletes anything.
    assert (await b.call("POST", DOCS, {"id": "g2", "text": GLOBEX, "shared": True})).status == 201
    assert "g2" in await ids(a)
    assert (await admin.call("DELETE", f"{DOCS}/globex")).status == 200
    assert await ids(b) == {"g2"}


async def test_default_ids_are_per_app(apps: tuple[Client, Client, Client, StateStore]) -> None:
    """The same text from two apps gets two ids: one id for both would tell
    the second app that the first had stored exactly this text."""
    a, b, _, _ = apps
    first = await a.call("POST", DOCS, {"text": ACME})
    second = await b.call("POST", DOCS, {"text": ACME})
    assert first.status == second.status == 201
    assert first.body["id"] != second.body["id"]
    again = await b.call("POST", DOCS, {"text": ACME})
    assert again.status == 200 and again.body["id"] == second.body["id"]


async def test_delete_reports_only_what_the_caller_can_see(
    apps: tuple[Client, Client, Client, StateStore],
) -> None:
    a, b, _, _ = apps
    text = "Jane Doe founded Acme Corporation. Acme Corporation is based in Springfield."
    assert (await a.call("POST", DOCS, {"id": "private", "text": text})).status == 201
    assert (await b.call("POST", DOCS, {"id": "mine", "text": text})).status == 201
    report = await b.call("DELETE", f"{DOCS}/mine")
    # Every fact of app-b's document is still stated by app-a's, privately:
    # for app-b they are all gone.
    assert report.body["entities_kept"] == report.body["relations_kept"] == 0
    assert report.body["relations_removed"] == 2


def test_names_and_facts_come_only_from_visible_documents(state_location: str | Path) -> None:
    """One graph per Gate, but a reader is shown only what visible sentences
    say: an alias learnt from a private document ("International Business
    Machines (IBM)") does not rename what another app knows as "IBM"."""
    with StateStore.open(state_location) as state:
        memory = Memory(state)
        memory.add(
            "International Business Machines (IBM) makes mainframes. IBM acquired Lotus.",
            document_id="a-doc",
            added_by="app-a",
        )
        memory.add("IBM acquired Red Hat in 2019.", document_id="b-doc", added_by="app-b")
        b, a = Access.of_app("app-b"), Access.of_app("app-a")

        answer = memory.ask("What did IBM acquire?", access=b)
        assert answer.entities == ("IBM",)
        assert {(f.subject, f.predicate, f.object) for f in answer.facts} == {
            ("IBM", "acquired", "Red Hat"),
            ("Red Hat", "acquired in", "2019"),
        }
        assert {c.document_id for c in answer.citations} == {"b-doc"}
        assert not memory.ask("What did International Business Machines acquire?", access=b).found
        makes = memory.ask("What does IBM make?", access=b)
        assert "mainframes" not in str(makes) and "International" not in str(makes)

        for reader in (a, OPERATOR):
            full = memory.ask("What did IBM acquire?", access=reader)
            assert full.entities == ("International Business Machines",)
        assert {f.object for f in memory.ask("What did IBM acquire?", access=a).facts} == {"Lotus"}
        # A reader that is no app in particular (the qg:// memory_query skill)
        # sees only what is shared.
        assert not memory.ask("What did IBM acquire?", access=SHARED_ONLY).facts
        memory.share("b-doc", True, access=Access.of_app("app-b"))
        assert memory.ask("What did IBM acquire?", access=SHARED_ONLY).entities == ("IBM",)
        assert [d.id for d in memory.documents(access=SHARED_ONLY)] == ["b-doc"]
        assert (
            memory.stored_sentences(
                [s.id for s in memory.document("a-doc", access=OPERATOR)[2]], access=b
            )
            == {}
        )

        with pytest.raises(DocumentNotFound):
            memory.document("a-doc", access=b)
        with pytest.raises(NotDocumentOwner):
            memory.delete("b-doc", access=a)
        with pytest.raises(DocumentConflict, match="is taken"):
            memory.add("IBM is big.", document_id="a-doc", added_by="app-b", replace=True)
        with pytest.raises(NotDocumentOwner):
            memory.share("b-doc", False, access=a)
        assert {d.id for d in memory.documents(access=OPERATOR)} == {"a-doc", "b-doc"}
        assert not any(memory.store.integrity_problems().values())


def test_documents_from_before_sharing_become_private_to_their_adder(tmp_path: Path) -> None:
    """Sharing came with a schema version of its own: a database written by
    the previous version is migrated, and its documents, which nobody chose
    to share, are private to the app that added them."""
    path = tmp_path / "state.db"
    before = MIGRATIONS.index(MEMORY_SHARING_MIGRATION)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (before,))
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO memory_documents (id, format, text, sha256, source_sha256, added_by,"
            " extractor, created_at) VALUES ('old', 'text', 'Acme is in Ohio.', 'x', 'x',"
            " 'app-a', 'rules', 0)"
        )
    finally:
        conn.close()
    with StateStore.open(path) as state:
        assert state.schema_version == len(MIGRATIONS)
        memory = Memory(state)
        assert [(d.id, d.shared) for d in memory.documents(access=OPERATOR)] == [("old", False)]
        assert [d.id for d in memory.documents(access=Access.of_app("app-a"))] == ["old"]
        assert memory.documents(access=Access.of_app("app-b")) == []
        assert memory.documents(access=SHARED_ONLY) == []
