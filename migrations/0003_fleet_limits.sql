-- patchbook's PostgreSQL store, version 3: the rollout policy's limits that a
-- shared run (`patchbook run --workers external`) keeps in the database, so
-- every worker keeps the same ones. `max_unreachable`: the run halts at
-- unreachable host max_unreachable + 1, decided by the UPDATE that counts it.
-- `max_unavailable`: one row per capped group with the hosts of the group in
-- flight, raised by the claim that takes a host (only if it stays within the
-- cap) and lowered by the end of that host's claim.

-- NULL: no unreachable limit (runs begun before this version).
ALTER TABLE run_control ADD COLUMN IF NOT EXISTS max_unreachable integer;

-- The host's groups that have a `max_unavailable` cap (`all` included).
ALTER TABLE host_claims ADD COLUMN IF NOT EXISTS capped_groups text[] NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS run_unavailable (
    run       text    NOT NULL REFERENCES runs (run),
    grp       text    NOT NULL,
    -- Hosts of the group that may be in flight at once.
    cap       integer NOT NULL,
    -- Hosts of the group claimed and not yet ended (a failed one until its
    -- rollback is over); a host taken over after its worker died keeps its place.
    in_flight integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    PRIMARY KEY (run, grp)
);
