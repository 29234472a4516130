-- Datasets: registry, versions, DAG pointer sets, partitions, reader pins, org members, DAG
-- members. Physical storage is named by dataset_uuid / dataset_version, never by the name.
-- Safe to run twice.

-- Org membership and roles live here, never in a token. The role 'admin' is the org admin.
CREATE TABLE IF NOT EXISTS org_members (
    org_id      uuid NOT NULL REFERENCES orgs (org_id),
    subject     text NOT NULL CHECK (subject <> ''),
    roles       text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, subject)
);

-- A DAG, minimally: enough for permissions and pointer sets (YAML deploy comes later).
-- active_generation names the DAG's active pointer set; a cutover or rollback moves it.
CREATE TABLE IF NOT EXISTS dags (
    dag_id             uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (org_id),
    name               text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,127}$'),
    active_generation  bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS dag_members (
    dag_id    uuid NOT NULL REFERENCES dags (dag_id),
    subject   text NOT NULL CHECK (subject <> ''),
    relation  text NOT NULL CHECK (relation IN ('deployer', 'triggerer')),
    PRIMARY KEY (dag_id, subject, relation)
);

-- The registry: authoritative for dataset_name -> dataset_uuid and producer metadata.
CREATE TABLE IF NOT EXISTS datasets (
    dataset_uuid     uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (org_id),
    name             text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,127}$'),
    dag_id           uuid NOT NULL REFERENCES dags (dag_id),
    job_name         text NOT NULL,
    output_index     int  NOT NULL DEFAULT 0 CHECK (output_index >= 0),
    storage_kind     text NOT NULL
                     CHECK (storage_kind IN ('parquet', 'postgres', 'buffered_postgres')),
    schema           jsonb NOT NULL DEFAULT '{}'::jsonb,
    update_strategy  text NOT NULL DEFAULT 'replace' CHECK (update_strategy IN ('replace', 'append')),
    unique_key       text[] NOT NULL DEFAULT '{}',
    read_roles       text[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE IF NOT EXISTS dataset_versions (
    dataset_version  uuid PRIMARY KEY,
    dataset_uuid     uuid NOT NULL REFERENCES datasets (dataset_uuid),
    state            text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'purged')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    purged_at        timestamptz
);
CREATE INDEX IF NOT EXISTS dataset_versions_dataset_idx ON dataset_versions (dataset_uuid);

-- Pointer sets: generation N of a DAG maps each dataset it produces to a version. Rows are
-- never updated; cutover inserts a generation, rollback moves dags.active_generation back to
-- the parent. Readers read the active generation in one statement: a whole set, never a mix.
CREATE TABLE IF NOT EXISTS dag_pointer_sets (
    dag_id             uuid NOT NULL REFERENCES dags (dag_id),
    generation         bigint NOT NULL,
    parent_generation  bigint,
    created_by         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, generation)
);

CREATE TABLE IF NOT EXISTS dag_pointers (
    dag_id           uuid NOT NULL,
    generation       bigint NOT NULL,
    dataset_uuid     uuid NOT NULL REFERENCES datasets (dataset_uuid),
    dataset_version  uuid NOT NULL REFERENCES dataset_versions (dataset_version),
    PRIMARY KEY (dag_id, generation, dataset_uuid),
    FOREIGN KEY (dag_id, generation) REFERENCES dag_pointer_sets (dag_id, generation)
);
CREATE INDEX IF NOT EXISTS dag_pointers_version_idx ON dag_pointers (dataset_version);

-- Committed partitions of a dataset version. A partition is live while superseded_at is NULL.
-- object_key is the canonical location under org/{org}/dataset/{uuid}/version/{version}/;
-- staged_key is where the committing attempt staged it. Until promoted, readers read staged_key.
CREATE TABLE IF NOT EXISTS dataset_partitions (
    partition_id     bigserial PRIMARY KEY,
    dataset_version  uuid NOT NULL REFERENCES dataset_versions (dataset_version),
    range_start      bigint,
    range_end        bigint,
    partition_key    text,
    object_key       text NOT NULL,
    staged_key       text NOT NULL,
    size             bigint NOT NULL CHECK (size >= 0),
    sha256           text NOT NULL,
    task_id          uuid NOT NULL,
    attempt          int  NOT NULL,
    promoted         boolean NOT NULL DEFAULT false,
    committed_at     timestamptz NOT NULL DEFAULT now(),
    superseded_at    timestamptz,
    CHECK ((range_start IS NULL) = (range_end IS NULL)),
    CHECK ((range_start IS NULL) <> (partition_key IS NULL)),
    CHECK (range_start IS NULL OR range_start < range_end)
);
-- at most one live partition per exact range / key: the guard against concurrent double commits
CREATE UNIQUE INDEX IF NOT EXISTS dataset_partitions_live_range_idx
    ON dataset_partitions (dataset_version, range_start, range_end)
    WHERE superseded_at IS NULL AND range_start IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS dataset_partitions_live_key_idx
    ON dataset_partitions (dataset_version, partition_key)
    WHERE superseded_at IS NULL AND partition_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS dataset_partitions_staged_idx ON dataset_partitions (task_id, attempt);
CREATE INDEX IF NOT EXISTS dataset_partitions_unpromoted_idx
    ON dataset_partitions (partition_id) WHERE NOT promoted;

-- A reader's pin lease on a version: while unexpired, the version cannot be purged.
CREATE TABLE IF NOT EXISTS dataset_pins (
    pin_id           uuid NOT NULL,
    dataset_version  uuid NOT NULL REFERENCES dataset_versions (dataset_version),
    subject          text NOT NULL,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (pin_id, dataset_version)
);
CREATE INDEX IF NOT EXISTS dataset_pins_version_idx ON dataset_pins (dataset_version, expires_at);

-- Attempts whose staging prefix the sweep has cleaned (so it is visited once).
CREATE TABLE IF NOT EXISTS staging_sweeps (
    task_id     uuid NOT NULL,
    attempt     int  NOT NULL,
    deleted     int  NOT NULL,
    cleaned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);
