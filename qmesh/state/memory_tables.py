"""The graph memory's tables, as migrations of the Gate's state store.

For: the SQL that :data:`qmesh.state.MIGRATIONS` appends, and the
guarantees the database itself enforces, so that no code path (nor a later
extractor, nor a hand-written ``sqlite3`` session with foreign keys on) can
store a fact without a source:

* A sentence is immutable, and ``length(text) = char_end - char_start``.
  (That its text is exactly ``document[char_start:char_end]`` is checked in
  Python before insertion: ``substr`` on a long document costs O(offset)
  per call in SQLite.)
* A mention is an exact span of its sentence (trigger: ``substr`` of the
  sentence, which is short).
* An entity has at least one mention, and a relation at least one
  supporting sentence: each row carries an *anchor* (one of its mentions,
  one of its supporting sentences) under a composite foreign key that is
  checked at COMMIT, so a transaction that would leave a node or an edge
  without provenance cannot commit.
* A supporting sentence mentions both ends of the relation it supports
  (trigger).
* When the last mention of an entity or the last support of a relation is
  deleted (for example because a document was deleted and its sentences went
  with it), the entity or relation is deleted too, and a removed anchor is
  moved to a remaining source (triggers). Deletion therefore keeps exactly
  the facts that still have a source.

Aliases are not a separate table: every mention keeps its surface form and
its normalised key, so an entity's aliases are its mentions' keys, each with
its own provenance (the view ``memory_aliases``).

Documents belong to the application that added them (``added_by``; NULL:
the operator). :data:`SHARING_MIGRATION`, a later schema version, adds
``shared``: whether every other application may read the document too.
Documents stored before it are not shared: nobody chose to share them.

On PostgreSQL (:data:`POSTGRES_MIGRATION`) the same guarantees hold, with
its own means: PL/pgSQL triggers (raising SQLSTATE 23000), deferred
composite foreign keys, and a generated ``tsvector`` column for the search.

Not for: the queries (:mod:`qmesh.memory.store`), which decide who sees
what. This module imports nothing from qmesh, because :mod:`qmesh.state.migrations`
imports it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATION", "POSTGRES_MIGRATION", "SHARING_MIGRATION"]

MIGRATION: Final[tuple[str, ...]] = (
    """
    CREATE TABLE memory_documents (
        id             TEXT PRIMARY KEY,
        title          TEXT NULL,
        format         TEXT NOT NULL CHECK (format IN ('text', 'markdown', 'html')),
        text           TEXT NOT NULL CHECK (length(text) > 0),
        sha256         TEXT NOT NULL,
        source_sha256  TEXT NOT NULL,
        added_by       TEXT NULL,
        extractor      TEXT NOT NULL,
        created_at     REAL NOT NULL
    )
    """,
    """
    CREATE TRIGGER memory_documents_immutable BEFORE UPDATE OF id, text ON memory_documents
    BEGIN
        SELECT RAISE(ABORT, 'memory: a document''s id and text never change');
    END
    """,
    """
    CREATE TABLE memory_sentences (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        document_id  TEXT NOT NULL REFERENCES memory_documents (id) ON DELETE CASCADE,
        char_start   INTEGER NOT NULL CHECK (char_start >= 0),
        char_end     INTEGER NOT NULL CHECK (char_end > char_start),
        text         TEXT NOT NULL CHECK (length(text) = char_end - char_start),
        UNIQUE (document_id, char_start)
    )
    """,
    """
    CREATE TRIGGER memory_sentences_immutable BEFORE UPDATE ON memory_sentences
    BEGIN
        SELECT RAISE(ABORT, 'memory: sentences never change');
    END
    """,
    """
    CREATE VIRTUAL TABLE memory_sentences_fts USING fts5 (
        text, content = 'memory_sentences', content_rowid = 'seq',
        tokenize = 'porter unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER memory_sentences_fts_insert AFTER INSERT ON memory_sentences
    BEGIN
        INSERT INTO memory_sentences_fts (rowid, text) VALUES (NEW.seq, NEW.text);
    END
    """,
    """
    CREATE TRIGGER memory_sentences_fts_delete AFTER DELETE ON memory_sentences
    BEGIN
        INSERT INTO memory_sentences_fts (memory_sentences_fts, rowid, text)
        VALUES ('delete', OLD.seq, OLD.text);
    END
    """,
    """
    CREATE TABLE memory_entities (
        id            INTEGER PRIMARY KEY,
        key           TEXT NOT NULL UNIQUE CHECK (length(key) > 0),
        name          TEXT NOT NULL,
        kind          TEXT NOT NULL,
        anchor_seq    INTEGER NOT NULL,
        anchor_start  INTEGER NOT NULL,
        FOREIGN KEY (id, anchor_seq, anchor_start)
            REFERENCES memory_mentions (entity_id, sentence_seq, char_start)
            DEFERRABLE INITIALLY DEFERRED
    )
    """,
    """
    CREATE TABLE memory_mentions (
        entity_id     INTEGER NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        sentence_seq  INTEGER NOT NULL REFERENCES memory_sentences (seq) ON DELETE CASCADE,
        char_start    INTEGER NOT NULL,
        char_end      INTEGER NOT NULL,
        surface       TEXT NOT NULL,
        surface_key   TEXT NOT NULL CHECK (length(surface_key) > 0),
        PRIMARY KEY (entity_id, sentence_seq, char_start)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX memory_mentions_sentence ON memory_mentions (sentence_seq)",
    "CREATE INDEX memory_mentions_surface_key ON memory_mentions (surface_key)",
    """
    CREATE TRIGGER memory_mentions_exact BEFORE INSERT ON memory_mentions
    WHEN NOT EXISTS (
        SELECT 1 FROM memory_sentences AS s
        WHERE s.seq = NEW.sentence_seq
          AND NEW.char_start >= s.char_start AND NEW.char_end <= s.char_end
          AND NEW.char_end > NEW.char_start
          AND substr(s.text, NEW.char_start - s.char_start + 1, NEW.char_end - NEW.char_start)
              = NEW.surface
    )
    BEGIN
        SELECT RAISE(ABORT, 'memory: a mention must be an exact span of a stored sentence');
    END
    """,
    """
    CREATE TRIGGER memory_mentions_immutable BEFORE UPDATE ON memory_mentions
    BEGIN
        SELECT RAISE(ABORT, 'memory: mentions never change (insert and delete instead)');
    END
    """,
    """
    CREATE TRIGGER memory_mentions_deleted AFTER DELETE ON memory_mentions
    BEGIN
        DELETE FROM memory_entities
        WHERE id = OLD.entity_id
          AND NOT EXISTS (SELECT 1 FROM memory_mentions WHERE entity_id = OLD.entity_id);
        UPDATE memory_entities
        SET (anchor_seq, anchor_start) = (
            SELECT sentence_seq, char_start FROM memory_mentions
            WHERE entity_id = OLD.entity_id
            ORDER BY sentence_seq, char_start LIMIT 1
        )
        WHERE id = OLD.entity_id
          AND anchor_seq = OLD.sentence_seq AND anchor_start = OLD.char_start;
    END
    """,
    """
    CREATE TABLE memory_relations (
        id          INTEGER PRIMARY KEY,
        subject_id  INTEGER NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        predicate   TEXT NOT NULL CHECK (length(predicate) BETWEEN 1 AND 60),
        object_id   INTEGER NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        anchor_seq  INTEGER NOT NULL,
        CHECK (subject_id != object_id),
        UNIQUE (subject_id, predicate, object_id),
        FOREIGN KEY (id, anchor_seq)
            REFERENCES memory_relation_support (relation_id, sentence_seq)
            DEFERRABLE INITIALLY DEFERRED
    )
    """,
    "CREATE INDEX memory_relations_object ON memory_relations (object_id)",
    """
    CREATE TRIGGER memory_relations_immutable
    BEFORE UPDATE OF subject_id, predicate, object_id ON memory_relations
    BEGIN
        SELECT RAISE(ABORT, 'memory: a relation''s subject, predicate and object never change');
    END
    """,
    """
    CREATE TABLE memory_relation_support (
        relation_id   INTEGER NOT NULL REFERENCES memory_relations (id) ON DELETE CASCADE,
        sentence_seq  INTEGER NOT NULL REFERENCES memory_sentences (seq) ON DELETE CASCADE,
        PRIMARY KEY (relation_id, sentence_seq)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX memory_relation_support_sentence ON memory_relation_support (sentence_seq)",
    """
    CREATE TRIGGER memory_support_mentions_both BEFORE INSERT ON memory_relation_support
    WHEN NOT EXISTS (
        SELECT 1 FROM memory_relations AS r
        WHERE r.id = NEW.relation_id
          AND EXISTS (SELECT 1 FROM memory_mentions
                      WHERE entity_id = r.subject_id AND sentence_seq = NEW.sentence_seq)
          AND EXISTS (SELECT 1 FROM memory_mentions
                      WHERE entity_id = r.object_id AND sentence_seq = NEW.sentence_seq)
    )
    BEGIN
        SELECT RAISE(ABORT, 'memory: a supporting sentence must mention both ends of its relation');
    END
    """,
    """
    CREATE TRIGGER memory_support_deleted AFTER DELETE ON memory_relation_support
    BEGIN
        DELETE FROM memory_relations
        WHERE id = OLD.relation_id
          AND NOT EXISTS (
              SELECT 1 FROM memory_relation_support WHERE relation_id = OLD.relation_id
          );
        UPDATE memory_relations
        SET anchor_seq = (
            SELECT min(sentence_seq) FROM memory_relation_support
            WHERE relation_id = OLD.relation_id
        )
        WHERE id = OLD.relation_id AND anchor_seq = OLD.sentence_seq;
    END
    """,
    """
    CREATE VIEW memory_aliases (entity_id, alias_key, alias, mentions) AS
    SELECT entity_id, surface_key, min(surface), count(*)
    FROM memory_mentions GROUP BY entity_id, surface_key
    """,
)

SHARING_MIGRATION: Final[tuple[str, ...]] = (
    """
    ALTER TABLE memory_documents
    ADD COLUMN shared INTEGER NOT NULL DEFAULT 0 CHECK (shared IN (0, 1))
    """,
    "CREATE INDEX memory_documents_added_by ON memory_documents (added_by)",
)
"""Whether a document is shared with every application (see the module docstring)."""

_FOLD_FROM: Final = (
    "ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöùúûüýÿĀāĂăĄąĆćĈĉĊċČčĎďĒēĔĕĖėĘęĚěĜĝ"
    "ĞğĠġĢģĤĥĨĩĪīĬĭĮįİĴĵĶķĹĺĻļĽľĿŀŃńŅņŇňŌōŎŏŐőŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽž"
)
_FOLD_TO: Final = (
    "AAAAAACEEEEIIIINOOOOOUUUUYaaaaaaceeeeiiiinooooouuuuyyAaAaAaCcCcCcCcDdEeEeEeEeEeGg"
    "GgGgGgHhIiIiIiIiIJjKkLlLlLlLlNnNnNnOoOoOoRrRrRrSsSsSsSsTtTtUuUuUuUuUuUuWwYyYZzZzZz"
)

POSTGRES_MIGRATION: Final[tuple[str, ...]] = (
    # Full-text search as FTS5's "porter unicode61 remove_diacritics 2" reads
    # text: English stems and no stop words (a question's "who" or "in" is
    # the caller's to drop, not the index's), Latin letters without their
    # diacritics (memory_fold, used by the index and by every query).
    # to_tsvector's English configuration is copied, with a stemmer that
    # keeps every word; unaccent is a contrib extension a managed server may
    # lack, so the folding is plain SQL.
    "CREATE TEXT SEARCH DICTIONARY memory_stem (TEMPLATE = snowball, LANGUAGE = english)",
    "CREATE TEXT SEARCH CONFIGURATION memory_search (COPY = pg_catalog.english)",
    """
    ALTER TEXT SEARCH CONFIGURATION memory_search
    ALTER MAPPING FOR asciiword, asciihword, hword_asciipart, word, hword, hword_part
    WITH memory_stem
    """,
    f"""
    CREATE FUNCTION memory_fold(input TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT translate(input, '{_FOLD_FROM}', '{_FOLD_TO}') $$
    """,
    # One function raises every refusal, with SQLSTATE 23000 (integrity
    # constraint violation) so that clients see a constraint, as SQLite's
    # RAISE(ABORT) is one.
    """
    CREATE FUNCTION memory_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'memory: %', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
    END
    $$
    """,
    """
    CREATE TABLE memory_documents (
        id             TEXT PRIMARY KEY,
        title          TEXT NULL,
        format         TEXT NOT NULL CHECK (format IN ('text', 'markdown', 'html')),
        text           TEXT NOT NULL CHECK (length(text) > 0),
        sha256         TEXT NOT NULL,
        source_sha256  TEXT NOT NULL,
        added_by       TEXT NULL,
        extractor      TEXT NOT NULL,
        created_at     DOUBLE PRECISION NOT NULL,
        shared         INTEGER NOT NULL DEFAULT 0 CHECK (shared IN (0, 1))
    )
    """,
    "CREATE INDEX memory_documents_added_by ON memory_documents (added_by)",
    """
    CREATE TRIGGER memory_documents_immutable BEFORE UPDATE OF id, text ON memory_documents
    FOR EACH ROW EXECUTE FUNCTION memory_refuse('a document''s id and text never change')
    """,
    """
    CREATE TABLE memory_sentences (
        seq          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        document_id  TEXT NOT NULL REFERENCES memory_documents (id) ON DELETE CASCADE,
        char_start   INTEGER NOT NULL CHECK (char_start >= 0),
        char_end     INTEGER NOT NULL CHECK (char_end > char_start),
        text         TEXT NOT NULL CHECK (length(text) = char_end - char_start),
        search       TSVECTOR GENERATED ALWAYS AS
                         (to_tsvector('memory_search', memory_fold(text))) STORED,
        UNIQUE (document_id, char_start)
    )
    """,
    "CREATE INDEX memory_sentences_search ON memory_sentences USING GIN (search)",
    """
    CREATE TRIGGER memory_sentences_immutable BEFORE UPDATE ON memory_sentences
    FOR EACH ROW EXECUTE FUNCTION memory_refuse('sentences never change')
    """,
    """
    CREATE TABLE memory_entities (
        id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        key           TEXT NOT NULL UNIQUE CHECK (length(key) > 0),
        name          TEXT NOT NULL,
        kind          TEXT NOT NULL,
        anchor_seq    BIGINT NOT NULL,
        anchor_start  INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE memory_mentions (
        entity_id     BIGINT NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        sentence_seq  BIGINT NOT NULL REFERENCES memory_sentences (seq) ON DELETE CASCADE,
        char_start    INTEGER NOT NULL,
        char_end      INTEGER NOT NULL,
        surface       TEXT NOT NULL,
        surface_key   TEXT NOT NULL CHECK (length(surface_key) > 0),
        PRIMARY KEY (entity_id, sentence_seq, char_start)
    )
    """,
    """
    ALTER TABLE memory_entities ADD CONSTRAINT memory_entities_anchor
    FOREIGN KEY (id, anchor_seq, anchor_start)
    REFERENCES memory_mentions (entity_id, sentence_seq, char_start)
    DEFERRABLE INITIALLY DEFERRED
    """,
    "CREATE INDEX memory_mentions_sentence ON memory_mentions (sentence_seq)",
    "CREATE INDEX memory_mentions_surface_key ON memory_mentions (surface_key)",
    """
    CREATE FUNCTION memory_mentions_exact() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM memory_sentences AS s
            WHERE s.seq = NEW.sentence_seq
              AND NEW.char_start >= s.char_start AND NEW.char_end <= s.char_end
              AND NEW.char_end > NEW.char_start
              AND substr(s.text, NEW.char_start - s.char_start + 1, NEW.char_end - NEW.char_start)
                  = NEW.surface
        ) THEN
            RAISE EXCEPTION 'memory: a mention must be an exact span of a stored sentence'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER memory_mentions_exact BEFORE INSERT ON memory_mentions
    FOR EACH ROW EXECUTE FUNCTION memory_mentions_exact()
    """,
    """
    CREATE TRIGGER memory_mentions_immutable BEFORE UPDATE ON memory_mentions
    FOR EACH ROW EXECUTE FUNCTION memory_refuse('mentions never change (insert and delete instead)')
    """,
    """
    CREATE FUNCTION memory_mentions_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM memory_entities
        WHERE id = OLD.entity_id
          AND NOT EXISTS (SELECT 1 FROM memory_mentions WHERE entity_id = OLD.entity_id);
        UPDATE memory_entities
        SET (anchor_seq, anchor_start) = (
            SELECT sentence_seq, char_start FROM memory_mentions
            WHERE entity_id = OLD.entity_id
            ORDER BY sentence_seq, char_start LIMIT 1
        )
        WHERE id = OLD.entity_id
          AND anchor_seq = OLD.sentence_seq AND anchor_start = OLD.char_start;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER memory_mentions_deleted AFTER DELETE ON memory_mentions
    FOR EACH ROW EXECUTE FUNCTION memory_mentions_deleted()
    """,
    """
    CREATE TABLE memory_relations (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        subject_id  BIGINT NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        predicate   TEXT NOT NULL CHECK (length(predicate) BETWEEN 1 AND 60),
        object_id   BIGINT NOT NULL REFERENCES memory_entities (id) ON DELETE CASCADE,
        anchor_seq  BIGINT NOT NULL,
        CHECK (subject_id != object_id),
        UNIQUE (subject_id, predicate, object_id)
    )
    """,
    "CREATE INDEX memory_relations_object ON memory_relations (object_id)",
    """
    CREATE TRIGGER memory_relations_immutable
    BEFORE UPDATE OF subject_id, predicate, object_id ON memory_relations
    FOR EACH ROW EXECUTE FUNCTION
        memory_refuse('a relation''s subject, predicate and object never change')
    """,
    """
    CREATE TABLE memory_relation_support (
        relation_id   BIGINT NOT NULL REFERENCES memory_relations (id) ON DELETE CASCADE,
        sentence_seq  BIGINT NOT NULL REFERENCES memory_sentences (seq) ON DELETE CASCADE,
        PRIMARY KEY (relation_id, sentence_seq)
    )
    """,
    """
    ALTER TABLE memory_relations ADD CONSTRAINT memory_relations_anchor
    FOREIGN KEY (id, anchor_seq) REFERENCES memory_relation_support (relation_id, sentence_seq)
    DEFERRABLE INITIALLY DEFERRED
    """,
    "CREATE INDEX memory_relation_support_sentence ON memory_relation_support (sentence_seq)",
    """
    CREATE FUNCTION memory_support_mentions_both() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM memory_relations AS r
            WHERE r.id = NEW.relation_id
              AND EXISTS (SELECT 1 FROM memory_mentions
                          WHERE entity_id = r.subject_id AND sentence_seq = NEW.sentence_seq)
              AND EXISTS (SELECT 1 FROM memory_mentions
                          WHERE entity_id = r.object_id AND sentence_seq = NEW.sentence_seq)
        ) THEN
            RAISE EXCEPTION 'memory: a supporting sentence must mention both ends of its relation'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER memory_support_mentions_both BEFORE INSERT ON memory_relation_support
    FOR EACH ROW EXECUTE FUNCTION memory_support_mentions_both()
    """,
    """
    CREATE FUNCTION memory_support_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM memory_relations
        WHERE id = OLD.relation_id
          AND NOT EXISTS (
              SELECT 1 FROM memory_relation_support WHERE relation_id = OLD.relation_id
          );
        UPDATE memory_relations
        SET anchor_seq = (
            SELECT min(sentence_seq) FROM memory_relation_support
            WHERE relation_id = OLD.relation_id
        )
        WHERE id = OLD.relation_id AND anchor_seq = OLD.sentence_seq;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER memory_support_deleted AFTER DELETE ON memory_relation_support
    FOR EACH ROW EXECUTE FUNCTION memory_support_deleted()
    """,
    """
    CREATE VIEW memory_aliases (entity_id, alias_key, alias, mentions) AS
    SELECT entity_id, surface_key, min(surface), count(*)
    FROM memory_mentions GROUP BY entity_id, surface_key
    """,
)
"""The same tables and guarantees on PostgreSQL, in one schema version:
PL/pgSQL triggers where SQLite has trigger bodies, a generated ``tsvector``
column with a GIN index where SQLite has FTS5, identity columns (given
explicitly by ``qmesh state migrate``) where SQLite has rowids."""
