-- The datasets a task may read: minted into its capability token's grants.datasets.read.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS read_datasets text[] NOT NULL DEFAULT '{}';
