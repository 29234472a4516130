-- The task projection every lock query reads, written once: what the kernel decides on
-- (trace_core.lifecycle.TaskView) and what a claim's answer, a renewed token and a staging
-- prefix need. Columns keep their stored types (uuid, not text) so filters on task_id use the
-- primary key; trace_lite.task_rows reads them by name. The payload is left out: only a claim
-- needs it, and it reads it as text (tasks.sql, lock_tasks_for_claim).
CREATE OR REPLACE VIEW task_heads AS
SELECT task_id, org_id, job_id, operator, state, attempt, lease_token, lease_expires_at,
       available_at, max_attempts, timeout_s, read_datasets
FROM tasks;
