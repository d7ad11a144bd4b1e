-- Ending a run ends its descendants in the same transaction: find a run's children fast.
CREATE INDEX runs_by_parent ON runs (parent_run_id);
