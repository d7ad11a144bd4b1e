-- Optional run attributes (issue 20): immutable ids of org, project and pipeline and the
-- deployment environment, as one JSON object of those that are set. Rows from before hold '{}'.
ALTER TABLE runs ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';

-- Part of the run's identity, like org/project/pipeline: never changed after the insert.
CREATE TRIGGER runs_attributes_are_immutable
BEFORE UPDATE OF attributes ON runs
FOR EACH ROW
WHEN (OLD.attributes IS DISTINCT FROM NEW.attributes)
EXECUTE FUNCTION tokenbroker_refuse('run identity columns are immutable');
