-- patchbook's PostgreSQL store, version 1: runs and their journal records.
-- Applied once, in a transaction, by `journal::pg::connect`; the row it adds to
-- schema_version says so. Never edit a released migration: add the next file.

CREATE TABLE runs (
    run      text PRIMARY KEY,
    operator text NOT NULL,
    created  timestamptz NOT NULL DEFAULT now()
);

-- One row per journal record. `line` is the record exactly as a run file would hold
-- it (the JSON the hash was computed over, `\u0000` escapes included, which jsonb
-- refuses); the other columns repeat its fields so the store can be queried and
-- ordered without parsing it. Readers trust `line` only: `audit verify` recomputes
-- every hash from it, so an edited column or line is caught like an edited file.
CREATE TABLE records (
    run   text   NOT NULL REFERENCES runs (run),
    seq   bigint NOT NULL,
    ts    text   NOT NULL,
    host  text,
    kind  text   NOT NULL,
    prev  text   NOT NULL,
    hash  text   NOT NULL,
    line  text   NOT NULL,
    PRIMARY KEY (run, seq)
);
CREATE INDEX records_by_host ON records (run, host);

