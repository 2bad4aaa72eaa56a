-- k6-ingest schema, version 1.
-- `runs` is shared with the application (which may create a row when a run starts);
-- the k6_* tables are owned by the worker. IDs the worker creates are UUIDv7 made in
-- Rust, so no database extension or function is needed for them.

CREATE TABLE IF NOT EXISTS runs (
    id              uuid PRIMARY KEY,
    job_id          uuid,
    test_id         uuid,
    organization_id uuid NOT NULL,
    project_id      uuid NOT NULL,
    status          varchar(50) NOT NULL
        CHECK (status IN ('pending', 'running', 'passed', 'failed', 'error', 'cancelled', 'timeout')),
    duration_ms     bigint CHECK (duration_ms IS NULL OR duration_ms >= 0),
    started_at      timestamptz,
    completed_at    timestamptz,
    artifact_paths  jsonb NOT NULL DEFAULT '{}'::jsonb,
    logs_s3_url     text,
    error_details   text,
    trigger         varchar(50),
    location        varchar(50),
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idx_runs_job_id ON runs (job_id);
CREATE INDEX IF NOT EXISTS idx_runs_status ON runs (status);
CREATE INDEX IF NOT EXISTS idx_runs_started_at ON runs (started_at DESC);
CREATE INDEX IF NOT EXISTS idx_runs_project_id ON runs (project_id);
CREATE INDEX IF NOT EXISTS idx_runs_organization_id ON runs (organization_id);

CREATE TABLE k6_performance_runs (
    id                    uuid PRIMARY KEY,
    run_id                uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    test_id               uuid NOT NULL,
    organization_id       uuid NOT NULL,
    project_id            uuid NOT NULL,
    location              varchar(50) NOT NULL DEFAULT 'us-east',
    status                varchar(50) NOT NULL
        CHECK (status IN ('passed', 'failed', 'error', 'cancelled', 'timeout')),
    started_at            timestamptz NOT NULL,
    completed_at          timestamptz,
    duration_ms           bigint,

    -- HTTP totals; failed_requests comes from http_req_failed (whose passes are failures).
    total_requests        bigint,
    failed_requests       bigint,
    request_rate          bigint,  -- requests per second x 100
    -- http_req_duration in whole milliseconds, rounded half away from zero.
    avg_response_time_ms  bigint,
    p50_response_time_ms  bigint,
    p90_response_time_ms  bigint,
    p95_response_time_ms  bigint,
    p99_response_time_ms  bigint,
    min_response_time_ms  bigint,
    max_response_time_ms  bigint,

    thresholds_passed     boolean,  -- NULL when the run had no thresholds
    thresholds_total      integer,
    thresholds_failed     integer,

    checks_total          bigint,
    checks_passed         bigint,
    checks_failed         bigint,

    vus_max               bigint,
    iterations_total      bigint,
    iterations_rate       bigint,  -- iterations per second x 100
    data_received_bytes   bigint,
    data_sent_bytes       bigint,

    exit_code             integer,
    k6_version            text,
    summary_format        varchar(50),
    -- Where each derived value came from ('summary' or 'samples'), and why a value is NULL.
    value_sources         jsonb NOT NULL DEFAULT '{}'::jsonb,
    warnings              jsonb NOT NULL DEFAULT '[]'::jsonb,

    summary_json          jsonb,   -- inlined up to the configured size
    summary_s3_url        text,    -- the full summary when it is too large to inline
    config_snapshot       jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT k6_performance_runs_run_id_key UNIQUE (run_id)
);

CREATE INDEX k6_runs_test_id_idx ON k6_performance_runs (test_id);
CREATE INDEX k6_runs_project_id_idx ON k6_performance_runs (project_id);
CREATE INDEX k6_runs_location_idx ON k6_performance_runs (location);
CREATE INDEX k6_runs_status_idx ON k6_performance_runs (status);
CREATE INDEX k6_runs_created_at_idx ON k6_performance_runs (created_at DESC);
CREATE INDEX k6_runs_project_location_created_idx
    ON k6_performance_runs (project_id, location, created_at DESC);
CREATE INDEX k6_runs_test_location_created_idx
    ON k6_performance_runs (test_id, location, created_at DESC);

-- One row per metric and submetric of a run. Integer columns are scaled: multiply by
-- 1/scale to get k6's value (time stats: scale 1000 = microseconds of k6's milliseconds;
-- data: 1 = bytes; rates: 10000; other values: 1000).
CREATE TABLE k6_metrics_history (
    id           uuid PRIMARY KEY,
    k6_run_id    uuid NOT NULL REFERENCES k6_performance_runs (id) ON DELETE CASCADE,
    metric_name  text NOT NULL,          -- the key as k6 wrote it, selector included
    base_name    text NOT NULL,
    metric_type  varchar(50),            -- counter | gauge | rate | trend
    contains     varchar(50),            -- default | time | data (NULL when unknown)
    tags         jsonb NOT NULL DEFAULT '{}'::jsonb,
    scale        integer NOT NULL,
    value        bigint,   -- gauge: last value; counter: total
    count        bigint,   -- trend: number of samples (when configured)
    rate         bigint,   -- rate metric: x 10000; counter: per second x scale
    rate_scale   integer,
    passes       bigint,
    fails        bigint,
    min_value    bigint,
    max_value    bigint,
    avg_value    bigint,
    med_value    bigint,
    p90_value    bigint,
    p95_value    bigint,
    p99_value    bigint,
    percentiles  jsonb NOT NULL DEFAULT '{}'::jsonb,  -- every p(N) stat, scaled
    raw_values   jsonb NOT NULL DEFAULT '{}'::jsonb,  -- the stats exactly as k6 wrote them
    sources      jsonb NOT NULL DEFAULT '{}'::jsonb,
    warnings     jsonb NOT NULL DEFAULT '[]'::jsonb,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT k6_metrics_history_run_metric_key UNIQUE (k6_run_id, metric_name)
);

CREATE INDEX k6_metrics_metric_name_idx ON k6_metrics_history (metric_name);
CREATE INDEX k6_metrics_recorded_at_idx ON k6_metrics_history (recorded_at DESC);

CREATE TABLE k6_threshold_results (
    id              uuid PRIMARY KEY,
    k6_run_id       uuid NOT NULL REFERENCES k6_performance_runs (id) ON DELETE CASCADE,
    metric_name     text NOT NULL,
    base_name       text NOT NULL,
    tags            jsonb NOT NULL DEFAULT '{}'::jsonb,
    expression      text NOT NULL,
    ok              boolean NOT NULL,
    aggregation     text,              -- the stat the expression tests, e.g. p(95)
    observed_value  bigint,            -- that stat, scaled like k6_metrics_history
    observed_scale  integer,
    observed_raw    double precision,  -- that stat exactly as k6 reported it
    observed_source varchar(20),       -- summary | samples
    CONSTRAINT k6_threshold_results_key UNIQUE (k6_run_id, metric_name, expression)
);

CREATE INDEX k6_threshold_results_k6_run_id_idx ON k6_threshold_results (k6_run_id);
CREATE INDEX k6_threshold_results_failed_idx ON k6_threshold_results (k6_run_id) WHERE NOT ok;

-- Checks are identified by their position in k6's group tree: names repeat across
-- groups, may be empty, and paths cannot be split on '::' safely.
CREATE TABLE k6_check_results (
    id          uuid PRIMARY KEY,
    k6_run_id   uuid NOT NULL REFERENCES k6_performance_runs (id) ON DELETE CASCADE,
    position    integer NOT NULL,
    group_path  text[] NOT NULL,   -- group names from the root
    path        text NOT NULL,     -- k6's own path string
    name        text NOT NULL,
    passes      bigint,   -- NULL only when k6 wrote an unusable number
    fails       bigint,
    CONSTRAINT k6_check_results_position_key UNIQUE (k6_run_id, position)
);

CREATE INDEX k6_check_results_k6_run_id_idx ON k6_check_results (k6_run_id);
