-- k6-ingest schema, version 3: k6 history partitioned by month, archivable to S3.
--
-- A run writes one k6_performance_runs row and about 150 detail rows; at 100,000 runs a
-- day that is 15 million rows a day. Partitioned by month, old months can be archived
-- to S3 and dropped whole (`k6-ingest archive`), and the dashboard's date-bounded
-- questions read only the months they name.
--
-- The partition key is the run's `started_at` (from the run-completed message, NOT NULL,
-- fixed for the life of a run). `created_at` (when the row was written) would put a
-- replayed or late run in the month it was ingested, not the month it ran, so the
-- history of a test would be scattered over months and an archive of "March" would not
-- hold March's runs. The detail tables carry a copy of `started_at` so that a run and
-- its details fall in the same month's partitions, reference the run through the
-- composite key (k6_run_id, started_at), and a month is archived or dropped as one unit.
--
-- Unique constraints on a partitioned table must include the partition key, so
-- `UNIQUE (run_id)` becomes `UNIQUE (run_id, started_at)`. "A run is stored once" is
-- still guaranteed by `runs` (not partitioned, primary key `id`): every write first
-- inserts or locks the run's `runs` row, then looks for an existing k6_performance_runs
-- row of that run_id in any month (db::Db::store_run).
--
-- There is no DEFAULT partition: a row for a month whose partition does not exist yet
-- would sit there and then forbid creating that month. Instead `k6_ensure_month(month)`
-- creates a month's four partitions (idempotent, serialised by an advisory lock); the
-- worker calls it before writing a run of a month it has not seen (a run from 2019 or
-- 2040 is stored like any other), and `k6-ingest partitions --ahead N` (a CronJob)
-- creates the coming months beforehand so that the worker rarely needs to.
-- Without a DEFAULT partition, "latest runs" ordered by started_at can also scan the
-- months newest first and stop early (an ordered Append).
--
-- Partitions are named `<table>_yYYYYmMM` and bounded in UTC.
--
-- `runs.k6_archived_month` marks runs whose k6 rows were archived to S3 and dropped:
-- such a run counts as stored (a redelivered message is not ingested again into a
-- dropped month); `k6_archived_months` records each archived month and its manifest.
--
-- Existing rows are copied into the partitioned tables inside this migration's
-- transaction (the tables are locked meanwhile: plan the deploy of this version).

CREATE FUNCTION k6_ensure_month(p_month date) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    m      date := date_trunc('month', p_month)::date;
    lo     text := to_char(m, 'YYYY-MM-DD') || ' 00:00:00+00';
    hi     text := to_char((m + interval '1 month')::date, 'YYYY-MM-DD') || ' 00:00:00+00';
    suffix text := '_y' || to_char(m, 'YYYY') || 'm' || to_char(m, 'MM');
    t      text;
    made   integer := 0;
BEGIN
    -- One creator at a time: two workers meeting a new month must not both create it.
    PERFORM pg_advisory_xact_lock(hashtext('k6_ensure_month'));
    IF to_regclass('k6_performance_runs' || suffix) IS NOT NULL
       AND to_regclass('k6_metrics_history' || suffix) IS NOT NULL
       AND to_regclass('k6_threshold_results' || suffix) IS NOT NULL
       AND to_regclass('k6_check_results' || suffix) IS NOT NULL THEN
        RETURN 0;
    END IF;
    -- Creating the partitions locks these tables (the foreign keys reach `runs`). Take
    -- the locks up front in the order a run's write takes them (runs, then the k6 tables
    -- parent first), so a write in flight finishes first instead of deadlocking with us.
    LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE;
    LOCK TABLE k6_performance_runs, k6_metrics_history, k6_threshold_results, k6_check_results
        IN ACCESS EXCLUSIVE MODE;
    -- The referenced table first: the detail partitions' foreign keys point at it.
    FOREACH t IN ARRAY ARRAY['k6_performance_runs', 'k6_metrics_history',
                             'k6_threshold_results', 'k6_check_results'] LOOP
        IF to_regclass(t || suffix) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           t || suffix, t, lo, hi);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$fn$;

-- Move the unpartitioned tables and their indexes out of the way.
ALTER TABLE k6_check_results RENAME TO k6_check_results_v2;
ALTER TABLE k6_threshold_results RENAME TO k6_threshold_results_v2;
ALTER TABLE k6_metrics_history RENAME TO k6_metrics_history_v2;
ALTER TABLE k6_performance_runs RENAME TO k6_performance_runs_v2;
DO $do$
DECLARE
    i record;
BEGIN
    FOR i IN SELECT c.relname FROM pg_index x
             JOIN pg_class c ON c.oid = x.indexrelid
             JOIN pg_class t ON t.oid = x.indrelid
             WHERE t.relname IN ('k6_performance_runs_v2', 'k6_metrics_history_v2',
                                 'k6_threshold_results_v2', 'k6_check_results_v2')
               AND t.relnamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', i.relname, i.relname || '_v2');
    END LOOP;
END
$do$;

CREATE TABLE k6_performance_runs (
    LIKE k6_performance_runs_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    CONSTRAINT k6_performance_runs_pkey PRIMARY KEY (id, started_at),
    CONSTRAINT k6_performance_runs_run_id_key UNIQUE (run_id, started_at),
    CONSTRAINT k6_performance_runs_run_id_fkey
        FOREIGN KEY (run_id) REFERENCES runs (id) ON DELETE CASCADE
) PARTITION BY RANGE (started_at);

CREATE INDEX k6_runs_test_id_idx ON k6_performance_runs (test_id);
CREATE INDEX k6_runs_project_id_idx ON k6_performance_runs (project_id);
CREATE INDEX k6_runs_location_idx ON k6_performance_runs (location);
CREATE INDEX k6_runs_status_idx ON k6_performance_runs (status);
CREATE INDEX k6_runs_created_at_idx ON k6_performance_runs (created_at DESC);
CREATE INDEX k6_runs_project_location_created_idx
    ON k6_performance_runs (project_id, location, created_at DESC);
CREATE INDEX k6_runs_test_location_created_idx
    ON k6_performance_runs (test_id, location, created_at DESC);
-- The dashboard's questions, by the partition key: latest runs of a project in a
-- location (newest months first, stopping early), a test's history in a date range.
CREATE INDEX k6_runs_project_location_started_idx
    ON k6_performance_runs (project_id, location, started_at DESC);
CREATE INDEX k6_runs_test_location_started_idx
    ON k6_performance_runs (test_id, location, started_at);

CREATE TABLE k6_metrics_history (
    LIKE k6_metrics_history_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED
        INCLUDING COMMENTS,
    started_at timestamptz NOT NULL,  -- the run's, the partition key
    CONSTRAINT k6_metrics_history_pkey PRIMARY KEY (id, started_at),
    CONSTRAINT k6_metrics_history_run_metric_hash_key
        UNIQUE (k6_run_id, metric_key_hash, started_at),
    CONSTRAINT k6_metrics_history_k6_run_id_fkey FOREIGN KEY (k6_run_id, started_at)
        REFERENCES k6_performance_runs (id, started_at) ON DELETE CASCADE
) PARTITION BY RANGE (started_at);
CREATE INDEX k6_metrics_metric_name_idx ON k6_metrics_history USING hash (metric_name);
CREATE INDEX k6_metrics_recorded_at_idx ON k6_metrics_history (recorded_at DESC);

CREATE TABLE k6_threshold_results (
    LIKE k6_threshold_results_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED
        INCLUDING COMMENTS,
    started_at timestamptz NOT NULL,
    CONSTRAINT k6_threshold_results_pkey PRIMARY KEY (id, started_at),
    CONSTRAINT k6_threshold_results_hash_key
        UNIQUE (k6_run_id, threshold_key_hash, started_at),
    CONSTRAINT k6_threshold_results_k6_run_id_fkey FOREIGN KEY (k6_run_id, started_at)
        REFERENCES k6_performance_runs (id, started_at) ON DELETE CASCADE
) PARTITION BY RANGE (started_at);
CREATE INDEX k6_threshold_results_k6_run_id_idx ON k6_threshold_results (k6_run_id);
CREATE INDEX k6_threshold_results_failed_idx ON k6_threshold_results (k6_run_id) WHERE NOT ok;

CREATE TABLE k6_check_results (
    LIKE k6_check_results_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    started_at timestamptz NOT NULL,
    CONSTRAINT k6_check_results_pkey PRIMARY KEY (id, started_at),
    CONSTRAINT k6_check_results_position_key UNIQUE (k6_run_id, position, started_at),
    CONSTRAINT k6_check_results_k6_run_id_fkey FOREIGN KEY (k6_run_id, started_at)
        REFERENCES k6_performance_runs (id, started_at) ON DELETE CASCADE
) PARTITION BY RANGE (started_at);
CREATE INDEX k6_check_results_k6_run_id_idx ON k6_check_results (k6_run_id);

-- Partitions for every month that has rows, and for this month and the next three.
SELECT k6_ensure_month(m)
FROM (
    SELECT DISTINCT date_trunc('month', started_at AT TIME ZONE 'UTC')::date AS m
    FROM k6_performance_runs_v2
    UNION
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')::date
    FROM generate_series(0, 3) AS n
) months;

-- Copy the rows; generated columns (the key hashes) are computed again.
INSERT INTO k6_performance_runs SELECT * FROM k6_performance_runs_v2;
INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, metric_type, contains, tags,
    scale, value, count, rate, rate_scale, passes, fails, min_value, max_value, avg_value, med_value,
    p90_value, p95_value, p99_value, percentiles, raw_values, sources, warnings, recorded_at, started_at)
SELECT m.id, m.k6_run_id, m.metric_name, m.base_name, m.metric_type, m.contains, m.tags,
    m.scale, m.value, m.count, m.rate, m.rate_scale, m.passes, m.fails, m.min_value, m.max_value,
    m.avg_value, m.med_value, m.p90_value, m.p95_value, m.p99_value, m.percentiles, m.raw_values,
    m.sources, m.warnings, m.recorded_at, p.started_at
FROM k6_metrics_history_v2 m JOIN k6_performance_runs_v2 p ON p.id = m.k6_run_id;
INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, tags, expression, ok,
    aggregation, observed_value, observed_scale, observed_raw, observed_source, started_at)
SELECT t.id, t.k6_run_id, t.metric_name, t.base_name, t.tags, t.expression, t.ok,
    t.aggregation, t.observed_value, t.observed_scale, t.observed_raw, t.observed_source, p.started_at
FROM k6_threshold_results_v2 t JOIN k6_performance_runs_v2 p ON p.id = t.k6_run_id;
INSERT INTO k6_check_results (id, k6_run_id, position, group_path, path, name, passes, fails,
    started_at)
SELECT c.id, c.k6_run_id, c.position, c.group_path, c.path, c.name, c.passes, c.fails, p.started_at
FROM k6_check_results_v2 c JOIN k6_performance_runs_v2 p ON p.id = c.k6_run_id;

DROP TABLE k6_check_results_v2, k6_threshold_results_v2, k6_metrics_history_v2,
    k6_performance_runs_v2;

-- Archived runs stay known: their k6 rows are in S3, their `runs` row stays here.
ALTER TABLE runs ADD COLUMN k6_archived_month date;
CREATE INDEX idx_runs_k6_archived_month ON runs (k6_archived_month)
    WHERE k6_archived_month IS NOT NULL;

-- One row per month whose partitions were archived to S3 and dropped.
CREATE TABLE k6_archived_months (
    month          date PRIMARY KEY,
    manifest_uri   text NOT NULL,
    manifest_sha256 text NOT NULL,
    row_counts     jsonb NOT NULL,
    schema_version bigint NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now()
);
