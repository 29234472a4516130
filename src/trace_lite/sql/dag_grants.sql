-- Read grants of DAG tasks (trace_lite.dag_grants): the datasets a job's declared inputs read,
-- with what the permission rules (trace_core.access) need, and the deployer of the version.

-- name: job_input_datasets
-- For each (dag, version, job): the datasets its inputs read -- from: {dataset: name} in the
-- DAG's org, and from: {job, output} where that output is published as a dataset -- with their
-- producing DAG and read_roles. An unpublished upstream output has no dataset and no row.
WITH k AS (
    SELECT * FROM unnest(%(dag_ids)s::uuid[], %(versions)s::bigint[], %(jobs)s::text[])
        AS k(dag_id, version, job)
)
SELECT DISTINCT k.dag_id::text AS dag_id, k.version, k.job, g.org_id::text AS org_id, d.name,
       d.dag_id::text AS producer_dag_id, d.read_roles
FROM k
JOIN dags g ON g.dag_id = k.dag_id
JOIN dag_inputs i ON (i.dag_id, i.version, i.job) = (k.dag_id, k.version, k.job)
JOIN datasets d ON d.org_id = g.org_id
               AND (d.name = i.from_dataset
                    OR (d.dag_id = i.dag_id AND d.job_name = i.from_job
                        AND d.output_index = i.from_output))
ORDER BY d.name;

-- name: version_deployers
-- For each (dag, version): who deployed it, with that subject's membership in the DAG's org
-- (roles, the DAGs it deploys or triggers, whether it is a member) as the rules need it.
WITH k AS (
    SELECT DISTINCT * FROM unnest(%(dag_ids)s::uuid[], %(versions)s::bigint[])
        AS k(dag_id, version)
)
SELECT k.dag_id::text AS dag_id, k.version, g.org_id::text AS org_id, v.created_by AS subject,
       coalesce(m.roles, '{}'::text[]) AS roles,
       coalesce((SELECT array_agg(DISTINCT dm.dag_id::text) FROM dag_members dm
                 JOIN dags dg ON dg.dag_id = dm.dag_id
                 WHERE dg.org_id = g.org_id AND dm.subject = v.created_by),
                '{}'::text[]) AS dags,
       m.subject IS NOT NULL AS member
FROM k
JOIN dags g ON g.dag_id = k.dag_id
JOIN dag_versions v ON (v.dag_id, v.version) = (k.dag_id, k.version)
LEFT JOIN org_members m ON m.org_id = g.org_id AND m.subject = v.created_by;
