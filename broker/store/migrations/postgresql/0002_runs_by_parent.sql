-- The cascade (EndRun ends every active descendant) walks runs by parent_run_id.
CREATE INDEX runs_by_parent ON runs (parent_run_id) WHERE parent_run_id <> '';
