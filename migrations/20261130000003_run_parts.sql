-- k6-ingest schema: runs split across runners (SPEC section 12).
--
-- One row per runner's part of a run, stored once whatever the order or number of its
-- deliveries. `runs` stays the anchor: the merged result of all parts lives in
-- `k6_performance_runs` and its detail rows like any whole run, written in the
-- transaction that stores the last part (under a lock on the `runs` row).
--
-- What a part keeps of its own: its exit code and status (as a whole run would have
-- them), its extracted columns, its artifacts (S3 URIs) and its summary, inline or by
-- URI, so that a later merge can read every part again.

CREATE TABLE k6_run_parts (
    id                uuid PRIMARY KEY,
    run_id            uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    part_index        integer NOT NULL CHECK (part_index >= 0),
    part_count        integer NOT NULL CHECK (part_count >= 1 AND part_index < part_count),
    runner            text,
    execution_segment text,
    event_id          uuid NOT NULL,
    exit_code         integer,
    status            varchar(50) NOT NULL
        CHECK (status IN ('passed', 'failed', 'error', 'cancelled', 'timeout')),
    -- The part's own extracted k6_performance_runs columns (as `k6-ingest extract`).
    columns           jsonb NOT NULL DEFAULT '{}'::jsonb,
    artifact_paths    jsonb NOT NULL DEFAULT '{}'::jsonb,
    summary_json      jsonb,
    summary_s3_url    text,
    -- S3 URI of the part's raw samples (--out json), when it sent them.
    metrics_s3_url    text,
    error_details     text,
    started_at        timestamptz,
    completed_at      timestamptz,
    -- What the merged run takes from its lowest-index part, whatever the arrival order.
    location          varchar(50),
    k6_version        text,
    config_snapshot   jsonb,
    metadata          jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT k6_run_parts_run_part_key UNIQUE (run_id, part_index)
);

-- The sweep of runs whose parts are still missing reads the oldest first part per run.
CREATE INDEX k6_run_parts_created_at_idx ON k6_run_parts (created_at);
