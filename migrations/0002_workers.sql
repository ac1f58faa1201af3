-- patchbook's PostgreSQL store, version 2: one rollout shared by a coordinator
-- (`patchbook run --workers external`) and any number of `patchbook worker`
-- processes. The coordinator writes a run's control row and one claim per target
-- host; workers claim hosts of the open wave under a lease; the failure budget is
-- counted here, in one row, so every worker sees the same budget. Never edit a
-- released migration: add the next file.

-- The run's control state: what workers need to join it and what the
-- coordinator decided so far.
CREATE TABLE run_control (
    run             text PRIMARY KEY REFERENCES runs (run),
    -- The playbook as the coordinator resolved it, and its SHA-256: a worker
    -- compiles the same file from its own project folder and refuses another.
    playbook        text NOT NULL,
    playbook_sha256 text NOT NULL,
    -- `--param` values as given: a secret reference (`${env:NAME}`) stays a
    -- reference, read by each worker in its own environment.
    params          jsonb NOT NULL DEFAULT '{}',
    waves           integer NOT NULL,
    -- The wave workers may claim hosts of; -1 before the first one opens.
    open_wave       integer NOT NULL DEFAULT -1,
    state           text NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'halted', 'finished')),
    halt_reason     text,
    -- Failures so far and how many the run tolerates: the run halts at
    -- failure max_failed + 1, decided by the UPDATE that counts it.
    failed          integer NOT NULL DEFAULT 0,
    max_failed      integer NOT NULL,
    unreachable     integer NOT NULL DEFAULT 0,
    -- Hosts one worker runs at once (the policy's `parallel`).
    parallel        integer NOT NULL DEFAULT 1,
    window_spec     text,
    updated         timestamptz NOT NULL DEFAULT now()
);

-- One row per target host of the run.
CREATE TABLE host_claims (
    run         text    NOT NULL REFERENCES runs (run),
    host        text    NOT NULL,
    wave        integer NOT NULL,
    -- Run order inside the wave.
    position    integer NOT NULL,
    -- The inventory var `zone`: only a worker of that zone takes the host.
    zone        text,
    state       text    NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'claimed', 'done', 'failed', 'unreachable')),
    worker      text,
    lease_until timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    -- The host's failure is in run_control.failed already (a worker that took
    -- the host over after a crash must not count it twice).
    counted     boolean NOT NULL DEFAULT false,
    reason      text,
    started     timestamptz,
    ended       timestamptz,
    PRIMARY KEY (run, host)
);
CREATE INDEX host_claims_by_wave ON host_claims (run, wave, state, position);
