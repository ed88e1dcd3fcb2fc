-- The deploy agent's latest report on a running operation, apart from `data` (which only the
-- executor writes), so a report arriving mid-transition is never overwritten.
ALTER TABLE operations ADD COLUMN report TEXT;
