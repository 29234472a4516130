-- Orgs, members and DAG membership (trace_lite.orgs). Roles live here, never in a token.

-- name: org_by_name
-- An org's id by name.
SELECT org_id::text AS org_id FROM orgs WHERE name = %(name)s;

-- name: ensure_org
-- Create the org if missing; return its id.
INSERT INTO orgs (org_id, name) VALUES (gen_random_uuid(), %(name)s)
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
RETURNING org_id::text AS org_id;

-- name: member
-- A subject's roles in an org, and the DAGs of that org it deploys or triggers.
SELECT coalesce((SELECT roles FROM org_members WHERE org_id = %(org_id)s AND subject = %(subject)s),
                '{}'::text[]) AS roles,
       coalesce((SELECT array_agg(DISTINCT m.dag_id::text) FROM dag_members m
                 JOIN dags g ON g.dag_id = m.dag_id
                 WHERE g.org_id = %(org_id)s AND m.subject = %(subject)s), '{}'::text[]) AS dags,
       EXISTS (SELECT 1 FROM org_members
               WHERE org_id = %(org_id)s AND subject = %(subject)s) AS member;

-- name: upsert_member
-- Set a member's roles.
INSERT INTO org_members (org_id, subject, roles) VALUES (%(org_id)s, %(subject)s, %(roles)s)
ON CONFLICT (org_id, subject) DO UPDATE SET roles = EXCLUDED.roles
RETURNING subject, roles;

-- name: delete_member
-- Remove a member (and their DAG memberships in the org).
WITH d AS (
    DELETE FROM dag_members m USING dags g
    WHERE m.dag_id = g.dag_id AND g.org_id = %(org_id)s AND m.subject = %(subject)s
)
DELETE FROM org_members WHERE org_id = %(org_id)s AND subject = %(subject)s
RETURNING subject, roles;

-- name: list_members
-- An org's members.
SELECT subject, roles FROM org_members WHERE org_id = %(org_id)s ORDER BY subject;

-- name: ensure_dag
-- Create a DAG if missing; return its id.
INSERT INTO dags (dag_id, org_id, name) VALUES (gen_random_uuid(), %(org_id)s, %(name)s)
ON CONFLICT (org_id, name) DO UPDATE SET name = EXCLUDED.name
RETURNING dag_id::text AS dag_id;

-- name: add_dag_member
-- Make a subject a deployer or triggerer of a DAG.
INSERT INTO dag_members (dag_id, subject, relation) VALUES (%(dag_id)s, %(subject)s, %(relation)s)
ON CONFLICT DO NOTHING;
