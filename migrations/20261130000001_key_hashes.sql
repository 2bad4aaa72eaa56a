-- k6-ingest schema, version 2: metric and threshold keys of any length.
--
-- k6 does not bound metric names, selectors or threshold expressions, but a btree index
-- row is limited to about 2.7 KB: a 10,000-character metric name made the whole run
-- fail on the unique constraints of version 1. Uniqueness per run is now enforced on a
-- SHA-256 of the key, a fixed 32 bytes, and the name lookup index is a hash index, which
-- stores only a hash of the value.
--
-- The key's bytes: `replace(t, '\', '\\')::bytea`. A text-to-bytea cast reads its input
-- as a bytea literal (backslash escapes, a leading `\x` means hex), so without doubling
-- the backslashes 'A' and '\x41' would hash alike and a stray backslash could fail the
-- cast; doubled, the literal stands for exactly the text's UTF-8 bytes. `convert_to`
-- would say that directly but is only STABLE, and a generated column needs IMMUTABLE
-- functions (sha256, replace, textout and byteain are; checked in tests/migrations.rs).
-- The threshold key joins metric name and expression with a NUL byte, which no text
-- value can contain, so the pair is read back unambiguously.
--
-- Adding a stored generated column rewrites each table once, under an exclusive lock.

ALTER TABLE k6_metrics_history
    ADD COLUMN metric_key_hash bytea NOT NULL
        GENERATED ALWAYS AS (sha256(replace(metric_name, E'\\', E'\\\\')::bytea)) STORED;
ALTER TABLE k6_metrics_history DROP CONSTRAINT k6_metrics_history_run_metric_key;
ALTER TABLE k6_metrics_history
    ADD CONSTRAINT k6_metrics_history_run_metric_hash_key UNIQUE (k6_run_id, metric_key_hash);
DROP INDEX k6_metrics_metric_name_idx;
CREATE INDEX k6_metrics_metric_name_idx ON k6_metrics_history USING hash (metric_name);

ALTER TABLE k6_threshold_results
    ADD COLUMN threshold_key_hash bytea NOT NULL
        GENERATED ALWAYS AS (sha256(
            replace(metric_name, E'\\', E'\\\\')::bytea
            || E'\\x00'::bytea
            || replace(expression, E'\\', E'\\\\')::bytea)) STORED;
ALTER TABLE k6_threshold_results DROP CONSTRAINT k6_threshold_results_key;
ALTER TABLE k6_threshold_results
    ADD CONSTRAINT k6_threshold_results_hash_key UNIQUE (k6_run_id, threshold_key_hash);
